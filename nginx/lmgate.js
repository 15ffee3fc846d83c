// LMGate's njs glue: keep a bounded head and tail of each provider response and, when the last
// buffer has passed, hand them to the sidecar in one detached POST. The client's bytes are passed
// on untouched and never wait for the sidecar. No JSON is parsed here: the sidecar does that.
//
// njs gives every request its own copy of this module's globals, so `st` is per request.
// Written for njs 0.7.9 (Debian 12) and later: no js_periodic, no shared dict, no ngx.fetch.

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

function report(r) {
    var v = r.variables;
    var tail = st.tail.length ? Buffer.concat(st.tail) : null;
    if (tail !== null && tail.length > st.tailMax) {
        tail = tail.slice(tail.length - st.tailMax);
    }
    var parts = tail === null ? st.head : st.head.concat([tail]);
    var body = parts.length === 1 ? parts[0] : Buffer.concat(parts);
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

// For access_log's if=: "1" unless the body filter has already reported this call.
function unreported(r) {
    return st !== null && st.reported ? '' : '1';
}

// "1" when body bytes passed but the last buffer never came: the answer was cut short.
function cut(r) {
    return st !== null && st.total > 0 && !st.reported ? '1' : '';
}

export default {capture, unreported, cut};
