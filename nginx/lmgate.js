// LMGate's njs glue: keep a bounded head and tail of each provider response, and hand them to
// nginx's access log line for the call (the spool the sidecar reads). The client's bytes are
// passed on untouched and never wait for anything. No JSON is parsed here: the sidecar does that.
//
// njs gives every request its own copy of this module's globals, so `st` is per request.
// Written for njs 0.7.9 (Debian 12) and later: no js_periodic, no shared dict, no ngx.fetch.

var crypto = require('crypto');  // loaded once with the module, not on every call
var st = null;

function start(r) {
    return {
        headMax: Number(r.variables.lmgate_capture_head),
        tailMax: Number(r.variables.lmgate_capture_tail),
        head: [],
        headLen: 0,
        tail: [],
        tailLen: 0,
        dropped: false,  // some bytes between the head and the tail were not kept
        total: 0,
        sent: -1,        // bytes the client got, when they differ from the provider's (>= 0)
        last: false      // the last buffer passed: the answer was complete
    };
}

function capture(r, data, flags) {
    r.sendBuffer(data, flags);
    keep(r, data, flags);
}

// Keeps the head and tail of the provider's bytes for the spool line.
function keep(r, data, flags) {
    if (st === null) {
        st = start(r);
    }
    var n = data.length;
    if (n > 0) {
        st.total += n;
        var room = st.headMax - st.headLen;
        if (room > 0) {
            var part = n <= room ? data : data.slice(0, room);
            st.head.push(part);
            st.headLen += part.length;
            data = n <= room ? null : data.slice(room);
        }
        if (data !== null && data.length > 0) {
            st.tail.push(data);
            st.tailLen += data.length;
            // Drop whole chunks that the tail no longer needs.
            while (st.tail.length > 1 && st.tailLen - st.tail[0].length >= st.tailMax) {
                st.tailLen -= st.tail.shift().length;
                st.dropped = true;
            }
        }
    }
    if (flags.last) {
        st.last = true;
    }
}

// For the call's spool line: "<bytes>:<flags>:<head>:<tail>", or "" when no body passed.
// bytes: what passed the filter ($body_bytes_sent also counts chunked framing); flags: "g" when
// bytes between the head and the tail were dropped, "x" when the last buffer never came (the
// answer was cut short, or the client went away); head: the whole body in base64 (without "g"),
// else its first headMax bytes; tail: with "g", the last tailMax bytes. Base64 because it is the
// cheapest byte-exact text njs makes (its UTF-8 decoding costs ~10x more) and needs no escaping.
// One function for all of it: each js_set costs a call into njs.
function body(r) {
    if (st === null || st.total === 0) {
        return '';
    }
    var tail = st.tail.length ? Buffer.concat(st.tail) : null;
    var gap = st.dropped || (tail !== null && tail.length > st.tailMax);
    var flags = (gap ? 'g' : '') + (st.last ? '' : 'x');
    var size = st.sent >= 0 ? st.sent : st.total;
    if (!gap) {
        var all = tail === null ? st.head : st.head.concat([tail]);
        return size + ':' + flags + ':' + Buffer.concat(all).toString('base64') + ':';
    }
    tail = tail.slice(tail.length - st.tailMax);
    return size + ':' + flags + ':' + Buffer.concat(st.head).toString('base64') + ':' +
        tail.toString('base64');
}

// The /auth cache key: a hash of every credential header (the names come from lmgate/providers.py,
// rendered into $lmgate_key_headers) and of the whole query string, or "" when there is none
// (then nothing is cached). Two requests the sidecar may answer differently must never get the
// same hash: the query counts whole, as a key can hide behind any encoding of a parameter name.
function authHash(r) {
    var names = r.variables.lmgate_key_headers.split(',');
    var h = r.headersIn;
    var s = '';
    var comma = false;
    for (var i = 0; i < names.length; i++) {
        var value = h[names[i]];
        if (value !== undefined) {
            s += names[i] + ':' + value + '\n';
            comma = comma || value.indexOf(',') >= 0;
        }
    }
    // njs joins repeats of a header with "," (nginx refuses a repeated Authorization;
    // test_a_cached_yes_never_answers_a_request_with_other_key_material holds the njs in use to
    // it). A comma is in no real key, so without one each value is one header, read exactly.
    if (comma) {
        s = everyKeyHeader(r, names);
    }
    var uri = r.variables.request_uri;
    var q = uri.indexOf('?');
    if (q >= 0) {
        s += uri.slice(q);
    }
    return s === '' ? '' : crypto.createHash('sha256').update(s).digest('base64url');
}

// Each copy of each credential header as sent, in order: the rare request with a comma in one.
// Reading every header costs ~2 us, so it is not done for every call.
function everyKeyHeader(r, names) {
    var h = r.rawHeadersIn;
    var s = '';
    for (var i = 0; i < h.length; i++) {
        var name = h[i][0].toLowerCase();
        if (names.indexOf(name) >= 0) {
            s += '*' + name + ':' + h[i][1] + '\n';
        }
    }
    return s;
}

// For the record of a refused call (evaluated only then): the masked form of every different
// credential the request carried, headers first, the way lmgate.keys.mask_key masks
// (the last 6 characters), percent-encoded for the spool line. Needs no sidecar.
function maskedKeys(r) {
    var names = r.variables.lmgate_key_headers.split(',');
    var h = r.rawHeadersIn;
    var found = [];
    for (var i = 0; i < h.length; i++) {
        var name = h[i][0].toLowerCase();
        if (names.indexOf(name) < 0) {
            continue;
        }
        var value = h[i][1].trim();
        if (name === 'authorization') {
            found.push(value.slice(value.indexOf(' ') + 1).trim());
        } else if (name === 'sec-websocket-protocol') {
            subprotocolKeys(r, value, found);
        } else {
            found.push(value);
        }
    }
    var params = r.variables.lmgate_key_params.split(',');
    var uri = r.variables.request_uri;
    var q = uri.indexOf('?');
    var parts = q >= 0 ? uri.slice(q + 1).split(/[&;]/) : [];
    for (var j = 0; j < parts.length; j++) {
        var eq = parts[j].indexOf('=');
        var param = eq > 0 ? decode(parts[j].slice(0, eq)) : '';
        if (param.charAt(0) === '$') {  // a Google system parameter: $key is key
            param = param.slice(1);
        }
        if (eq > 0 && params.indexOf(param) >= 0) {
            found.push(decode(parts[j].slice(eq + 1)));
        }
    }
    var masked = [];
    for (var k = 0; k < found.length; k++) {
        if (found[k] !== '') {
            var m = found[k].length > 12 ? '...' + found[k].slice(-6) : '...';
            if (masked.indexOf(m) < 0) {
                masked.push(m);
            }
        }
    }
    try {
        return encodeURIComponent(masked.join(','));
    } catch (e) {  // not text (a lone surrogate)
        return '...';
    }
}

// The keys in a WebSocket subprotocol list (`openai-insecure-api-key.<key>`, ...).
function subprotocolKeys(r, value, found) {
    var prefixes = r.variables.lmgate_key_subprotocols.split(',');
    var protocols = value.split(',');
    for (var i = 0; i < protocols.length; i++) {
        var p = protocols[i].trim();
        for (var j = 0; j < prefixes.length; j++) {
            if (prefixes[j] !== '' && p.indexOf(prefixes[j]) === 0) {
                found.push(p.slice(prefixes[j].length));
            }
        }
    }
}

function decode(text) {
    try {
        return decodeURIComponent(text.replace(/\+/g, ' '));
    } catch (e) {
        return text;
    }
}

// ---- a key with a `models` policy (nginx/provider.conf.template, /_lmgate_model/<provider>): the
// sidecar answered "check_model <regular expression>" (lmgate/allowlist.py models_regex, the
// allow-list's fnmatch patterns). A body that is not JSON with a string `model`, or that nginx
// could not hold in memory (r.requestText throws), is refused: the policy fails closed.
function checkModel(r) {
    var prefix = r.variables.lmgate_raw_prefix;
    var ok = false;
    try {
        var doc = JSON.parse(r.requestText);
        ok = doc !== null && typeof doc === 'object' && typeof doc.model === 'string' &&
            new RegExp(r.variables.lmgate_policy.slice(12)).test(doc.model);
    } catch (e) {
        ok = false;
    }
    if (!ok) {
        r.internalRedirect('@lmgate_model_refused_' + prefix);
    } else if (r.variables.lmgate_stream_usage === '1') {
        // A stream-usage path (stats.ensure_stream_usage: the nested location set the variable):
        // the named location that looks at a body already read (openai_stream_usage_named).
        r.internalRedirect('@lmgate_' + prefix + '_body');
    } else {
        r.internalRedirect('@lmgate_model_ok_' + prefix);
    }
}


// ---- stats.ensure_stream_usage: OpenAI chat/completions and completions streams that do not ask
// for usage get `stream_options.include_usage` added on the way up; on the way down the client
// gets the stream it asked for (no usage chunk, no `"usage":null`), the spool line the provider's.
// Only the nested locations of nginx/openai_stream_usage.conf.template use these.

var INCLUDE_USAGE = '"stream_options":{"include_usage":true},';
var rewritten = false;  // this request's body was rewritten (module globals are per request)
var held = null;        // the start of an SSE event whose end has not come yet
var dropping = false;   // the answer is a 200 stream of a rewritten request

// The rewritten body, or "" to send the body as it came (nginx.conf.template then takes
// $request_body itself: a string made by njs may not keep invalid UTF-8 bytes as they were). The
// locations call it only for a POST whose body nginx holds in memory (a body in a file has
// not matched the regexes that lead here).
function streamUsageBody(r) {
    var body = r.variables.request_body;
    if (!body || body.indexOf('"stream"') < 0) {
        return '';
    }
    var doc;
    try {
        doc = JSON.parse(body);
    } catch (e) {
        return '';  // not JSON: untouched, the provider answers it
    }
    if (doc === null || typeof doc !== 'object' || doc.stream !== true) {
        return '';
    }
    var opts = doc.stream_options;
    if (opts !== null && typeof opts === 'object' && opts.include_usage === true) {
        return '';
    }
    if (opts === undefined) {
        // Added after the opening brace: every other byte stays as sent.
        var brace = body.indexOf('{');
        rewritten = true;
        return body.slice(0, brace + 1) + INCLUDE_USAGE + body.slice(brace + 1);
    }
    if ((opts !== null && typeof opts !== 'object') || Array.isArray(opts) || /[0-9]{16}/.test(body)) {
        return '';  // odd options, or integers a re-serialisation could round: untouched
    }
    doc.stream_options = Object.assign({}, opts, {include_usage: true});
    rewritten = true;
    return JSON.stringify(doc);
}

// Bodies of 2 KB or more: nginx has read the body before this content handler runs; the named
// location it hands the call to looks at it (nginx/openai_stream_usage_named.conf.template).
function readBody(r) {
    r.internalRedirect(r.variables.lmgate_read_body_next);
}

function captureStreamUsage(r, data, flags) {
    if (!rewritten) {
        capture(r, data, flags);
        return;
    }
    if (st === null) {
        st = start(r);
        st.sent = 0;
        dropping = r.status === 200 &&
            String(r.headersOut['Content-Type']).indexOf('text/event-stream') === 0;
    }
    keep(r, data, flags);
    if (!dropping) {
        send(r, data, flags);
        return;
    }
    // Whole events only: a needle may be split between two buffers. Providers write an event at
    // a time, so a buffer usually ends with one (checked first: each njs call costs ~0.5 us).
    var buf = held === null ? data : Buffer.concat([held, data]);
    var n = buf.length;
    held = null;
    if (!flags.last && !(n > 1 && buf[n - 1] === 10 && buf[n - 2] === 10)) {
        var end = eventsEnd(buf);
        if (end < n) {
            held = buf.slice(end);
            buf = buf.slice(0, end);
        }
    }
    sendWithoutUsage(r, buf, flags);
}

function send(r, buf, flags) {
    st.sent += buf.length;
    r.sendBuffer(buf, flags);
}

// The end of the last complete SSE event in buf (0 when there is none).
function eventsEnd(buf) {
    var lf = buf.lastIndexOf('\n\n');
    var crlf = buf.lastIndexOf('\r\n\r\n');
    return Math.max(lf < 0 ? 0 : lf + 2, crlf < 0 ? 0 : crlf + 4);
}

// Sends buf without `,"usage":null`, and without the usage chunk's event (a usage object and
// `"choices":[]`). Neither needle can occur inside a JSON string, where every quote is escaped.
// Slices are sent as they are: cheaper in njs than joining them.
function sendWithoutUsage(r, buf, flags) {
    var pos = 0;
    var i = buf.indexOf(',"usage":');
    while (i >= 0) {
        var c = buf[i + 9];
        if (c === 0x6e && buf[i + 12] === 0x6c) {  // null
            if (i > pos) {
                send(r, buf.slice(pos, i), {last: false});
            }
            pos = i + 13;
        } else if (c === 0x7b) {  // {
            var before = buf.lastIndexOf('\n\n', i);
            var beforeCrlf = buf.lastIndexOf('\r\n\r\n', i);
            var from = Math.max(before < 0 ? 0 : before + 2, beforeCrlf < 0 ? 0 : beforeCrlf + 4);
            var lf = buf.indexOf('\n\n', i);
            var crlf = buf.indexOf('\r\n\r\n', i);
            var to = lf < 0 ? buf.length : lf + 2;
            if (crlf >= 0 && crlf + 4 < to) {
                to = crlf + 4;
            }
            if (from >= pos && buf.slice(from, to).indexOf('"choices":[]') >= 0) {
                if (from > pos) {
                    send(r, buf.slice(pos, from), {last: false});
                }
                pos = to;
            }
        }
        i = buf.indexOf(',"usage":', Math.max(i + 9, pos));
    }
    send(r, pos === 0 ? buf : buf.slice(pos), flags);
}

export default {authHash, maskedKeys, capture, body, checkModel, streamUsageBody, readBody,
                captureStreamUsage};
