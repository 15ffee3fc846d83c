// LMGate's njs glue: keep a bounded head and tail of each provider response and, when the last
// buffer has passed, hand them to the sidecar in one detached POST. The client's bytes are passed
// on untouched and never wait for the sidecar. No JSON is parsed here: the sidecar does that.
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
        total: 0,
        reported: false
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
            }
        }
    }
    if (flags.last && !st.reported) {
        st.reported = true;
        report(r);
    }
}

// The kept head (at most headMax bytes of it) followed by the kept tail (its last tailMax bytes).
function kept(headMax, tailMax) {
    var head = st.head;
    if (st.headLen > headMax) {
        head = [Buffer.concat(head).slice(0, headMax)];
    }
    var tail = st.tail.length ? Buffer.concat(st.tail) : null;
    if (tail !== null && tail.length > tailMax) {
        tail = tail.slice(tail.length - tailMax);
    }
    var parts = tail === null ? head : head.concat([tail]);
    return parts.length === 1 ? parts[0] : Buffer.concat(parts);
}

function report(r) {
    var v = r.variables;
    var body = kept(st.headMax, st.tailMax);
    // Values from the sidecar (id, owner, key) arrive already percent-encoded.
    var args = 'rid=' + v.request_id +
        '&id=' + v.lmgate_id +
        '&own=' + v.lmgate_owner +
        '&mk=' + v.lmgate_key +
        '&p=' + v.lmgate_raw_prefix +
        '&m=' + v.request_method +
        '&u=' + encodeURIComponent(v.lmgate_path) +
        '&s=' + r.status +
        '&ct=' + encodeURIComponent(r.headersOut['Content-Type'] || '') +
        '&t=' + v.request_time +
        '&ts=' + v.msec +
        '&h=' + st.headLen +
        '&n=' + st.total;
    r.subrequest('/_stats', {method: 'POST', detached: true, args: args, body: body || ''});
}

// The /auth cache key: a hash of every header and the query string the sidecar may read a key
// from, or "" when there is none (then nothing is cached).
function authHash(r) {
    var h = r.rawHeadersIn;
    var s = '';
    for (var i = 0; i < h.length; i++) {
        var name = h[i][0].toLowerCase();
        if (name === 'authorization' || name === 'x-api-key' || name === 'x-goog-api-key') {
            s += name + ':' + h[i][1] + '\n';
        }
    }
    var uri = r.variables.request_uri;
    var q = uri.indexOf('?');
    if (q >= 0 && uri.indexOf('key=', q) >= 0) {
        s += uri.slice(q);
    }
    return s === '' ? '' : crypto.createHash('sha256').update(s).digest('base64url');
}

// For access_log's if=: "1" unless the body filter has already reported this call.
function unreported(r) {
    return st !== null && st.reported ? '' : '1';
}

// For the fallback log line of a call whose last buffer never came (the client went away, or the
// answer broke off): "<head length>:<body bytes>:<base64 of a smaller head and tail>", so the
// sidecar can still read the usage a stream carried before it was cut. "" when no body passed.
var FALLBACK_HEAD = 4096;
var FALLBACK_TAIL = 8192;

function fallbackCapture(r) {
    if (st === null || st.total === 0 || st.reported) {
        return '';
    }
    return Math.min(st.headLen, FALLBACK_HEAD) + ':' + st.total + ':' +
        kept(FALLBACK_HEAD, FALLBACK_TAIL).toString('base64');
}

// "1" when body bytes passed but the last buffer never came: the answer was cut short.
function cut(r) {
    return st !== null && st.total > 0 && !st.reported ? '1' : '';
}

export default {authHash, capture, unreported, cut, fallbackCapture};
