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
        last: false      // the last buffer passed: the answer was complete
    };
}

function capture(r, data, flags) {
    r.sendBuffer(data, flags);
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
    if (!gap) {
        var all = tail === null ? st.head : st.head.concat([tail]);
        return st.total + ':' + flags + ':' + Buffer.concat(all).toString('base64') + ':';
    }
    tail = tail.slice(tail.length - st.tailMax);
    return st.total + ':' + flags + ':' + Buffer.concat(st.head).toString('base64') + ':' +
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
// credential the request carried, headers first, the way lmgate.allowlist.mask_key masks
// (the last 6 characters), percent-encoded for the spool line. Needs no sidecar.
function maskedKeys(r) {
    var names = r.variables.lmgate_key_headers.split(',');
    var h = r.rawHeadersIn;
    var found = [];
    for (var i = 0; i < h.length; i++) {
        var name = h[i][0].toLowerCase();
        if (names.indexOf(name) >= 0) {
            var value = h[i][1].trim();
            if (name === 'authorization') {
                value = value.slice(value.indexOf(' ') + 1).trim();
            }
            found.push(value);
        }
    }
    var params = r.variables.lmgate_key_params.split(',');
    var uri = r.variables.request_uri;
    var q = uri.indexOf('?');
    var parts = q >= 0 ? uri.slice(q + 1).split(/[&;]/) : [];
    for (var j = 0; j < parts.length; j++) {
        var eq = parts[j].indexOf('=');
        if (eq > 0 && params.indexOf(decode(parts[j].slice(0, eq))) >= 0) {
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

function decode(text) {
    try {
        return decodeURIComponent(text.replace(/\+/g, ' '));
    } catch (e) {
        return text;
    }
}

export default {authHash, maskedKeys, capture, body};
