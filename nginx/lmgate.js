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

// The /auth cache key: a hash of every header and the query string the sidecar may read a key
// from, or "" when there is none (then nothing is cached). Two requests the sidecar may answer
// differently must never get the same hash.
function authHash(r) {
    var h = r.headersIn;
    // nginx refuses a repeated Authorization header; njs joins repeats of other headers with ","
    // (test_a_cached_yes_never_answers_a_request_with_other_key_material holds the njs in use to
    // it). A comma is in no real key, so without one each value is one header, read exactly.
    var xKey = h['X-Api-Key'];
    var googKey = h['X-Goog-Api-Key'];
    var s = (xKey !== undefined && xKey.indexOf(',') >= 0) ||
            (googKey !== undefined && googKey.indexOf(',') >= 0)
        ? everyKeyHeader(r)
        : keyHeader('authorization', h.authorization) + keyHeader('x-api-key', xKey) +
          keyHeader('x-goog-api-key', googKey);
    var uri = r.variables.request_uri;
    var q = uri.indexOf('?');
    if (q >= 0 && uri.indexOf('key=', q) >= 0) {
        s += uri.slice(q);
    }
    return s === '' ? '' : crypto.createHash('sha256').update(s).digest('base64url');
}

function keyHeader(name, value) {
    return value === undefined ? '' : name + ':' + value + '\n';
}

// Each copy of each key header as sent, in order: the rare request with a comma in one. Reading
// every header costs ~2 us, so it is not done for every call.
function everyKeyHeader(r) {
    var h = r.rawHeadersIn;
    var s = '';
    for (var i = 0; i < h.length; i++) {
        var name = h[i][0].toLowerCase();
        if (name === 'authorization' || name === 'x-api-key' || name === 'x-goog-api-key') {
            s += '*' + keyHeader(name, h[i][1]);
        }
    }
    return s;
}

export default {authHash, capture, body};
