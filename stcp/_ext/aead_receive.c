/*
 * stcp._aead, the bulk receive: RecordCipher.open_records (stcp/crypto.py
 * RecordKey.open_records is the reference; tests/test_aead_ext.py fuzzes C against it).
 *
 * One connection's datagrams of a receive batch (grouped by stcp._demux.group_by_cid) go
 * through three passes: split (buffer, segment_size) pairs into records and screen each
 * header (this connection, this epoch, a pn above every one seen: never a replay), with
 * the GIL held; open every record that passed, with the GIL released; then join stretches
 * of plain in-order stream data into one bytes object each.  Anything that fails a check
 * comes back untouched for the caller's one-record path, which judges it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <stdint.h>

#include "aead.h"
#include "scratch.h"

static scratch_t plaintexts;     /* open_records' plaintexts, kept between calls */

int aead_receive_init(void) {
    return scratch_init(&plaintexts);
}

/* Is this plaintext one STREAM frame without FIN and nothing else, ending at or below
 * `limit` and below 2^62?  Sets *offset and *len when it is. */
static int simple_stream(const unsigned char *pt, Py_ssize_t ptlen, uint64_t limit,
                         uint64_t *offset, Py_ssize_t *len) {
    if (ptlen < STREAM_FRAME_OVERHEAD || pt[0] != FRAME_STREAM || pt[1] != 0) return 0;
    *len = ((Py_ssize_t)pt[10] << 8) | pt[11];
    *offset = get_be64(pt + 2);
    if (*len != ptlen - STREAM_FRAME_OVERHEAD) return 0;
    if (*offset > limit || (uint64_t)*len > limit - *offset) return 0;
    return *offset + (uint64_t)*len < ((uint64_t)1 << 62);
}

/* The bulk-receive hot path, for one connection's datagrams of a receive batch, in order.
 * A record is "new" when its header is well formed for this connection (length field,
 * cid, seq != 0, current epoch) and its pn is above every pn seen so far (`largest_pn`,
 * then every record before it in the call), so it cannot be a replay. New records are
 * opened; each stretch of new authentic records with consecutive pns whose plaintexts are
 * plain in-order stream data (one STREAM frame without FIN, each starting where the
 * previous ended, ending at or below `limit`, below 2^62) is joined. Returns a list, in
 * datagram order, of
 *   (offset, count, data, first_pn, record_bytes)  a stretch;
 *   (plaintext, pn, record_len)                    any other new authentic record;
 *   the datagram itself                            everything else, for the general path.
 */
typedef struct {
    const unsigned char *buf;
    Py_ssize_t item;       /* index of the datagrams entry it came from */
    Py_ssize_t len;
    uint64_t pn;
    Py_ssize_t pos;        /* plaintext offset in the scratch buffer */
    signed char state;     /* 0 new + opened, 1 not new / malformed / not authentic, -1 lib error */
} rx_record;

PyObject *RecordCipher_open_records(RecordCipher *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *fast = NULL, *result = NULL;
    Py_buffer *views = NULL;
    rx_record *recs = NULL;
    unsigned char *plain = NULL;
    Py_ssize_t m = 0, nviews = 0, n = 0, i, total = 0;
    Py_ssize_t *segs = NULL;
    uint64_t cid, epoch, high, limit, max_len = UINT64_MAX;
    int liberr = 0, shared = 0;

    if (!ready(self)) return NULL;
    if (nargs != 5 && nargs != 6) {
        PyErr_Format(PyExc_TypeError, "open_records() takes 5 or 6 arguments (datagrams, cid, epoch, largest_pn, "
                     "limit[, max_len]), got %zd", nargs);
        return NULL;
    }
    if (get_u64(args[1], "cid", &cid) || get_u64(args[2], "epoch", &epoch) || get_u64(args[4], "limit", &limit))
        return NULL;
    /* records longer than max_len (the receiver's max_datagram) are not opened: the general
     * path discards them (PROTOCOL.md 7) */
    if (nargs == 6 && get_u64(args[5], "max_len", &max_len)) return NULL;
    {   /* largest_pn may be -1: nothing received yet */
        long long lp = PyLong_AsLongLong(args[3]);
        if (lp == -1 && PyErr_Occurred()) return NULL;
        if (lp < -1) { PyErr_SetString(PyExc_ValueError, "largest_pn must be -1 or more"); return NULL; }
        high = lp < 0 ? 0 : (uint64_t)lp;     /* pn 0 is never a data record's, so 0 works as "none" */
    }
    /* each entry is a datagram, or a (buffer, segment_size) pair of datagrams back to back */
    fast = PySequence_Fast(args[0], "open_records() takes a list of datagrams");
    if (!fast) return NULL;
    m = PySequence_Fast_GET_SIZE(fast);
    views = PyMem_Calloc(m ? (size_t)m : 1, sizeof(Py_buffer));
    segs = PyMem_Calloc(m ? (size_t)m : 1, sizeof(Py_ssize_t));
    if (!views || !segs) { PyErr_NoMemory(); goto done; }
    for (nviews = 0; nviews < m; nviews++) {
        PyObject *entry = PySequence_Fast_GET_ITEM(fast, nviews);
        if (PyTuple_Check(entry)) {
            if (PyTuple_GET_SIZE(entry) != 2) {
                PyErr_SetString(PyExc_TypeError, "open_records() pairs must be (buffer, segment_size)");
                goto done;
            }
            segs[nviews] = PyLong_AsSsize_t(PyTuple_GET_ITEM(entry, 1));
            if (segs[nviews] == -1 && PyErr_Occurred()) goto done;
            if (segs[nviews] < 1) { PyErr_SetString(PyExc_ValueError, "segment_size must be positive"); goto done; }
            entry = PyTuple_GET_ITEM(entry, 0);
        }
        if (get_buffer(entry, &views[nviews], "datagram")) goto done;
        /* records in the entry; no len + seg - 1, which overflows for a huge segment_size */
        n += segs[nviews] ? views[nviews].len / segs[nviews] + (views[nviews].len % segs[nviews] != 0) : 1;
    }
    recs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(rx_record));
    if (!recs) { PyErr_NoMemory(); goto done; }
    /* a datagram is one record, however short; a pair is as many as it has segments, so an
     * empty pair is none (wire.expand_datagrams), exactly as many as counted above */
    for (Py_ssize_t e = 0, k = 0; e < m; e++) {
        Py_ssize_t len = views[e].len, seg = segs[e], off = 0;
        if (!segs[e]) {
            recs[k].buf = views[e].buf;
            recs[k].len = len;
            recs[k++].item = e;
            continue;
        }
        for (; off < len; off = len - off > seg ? off + seg : len) {
            recs[k].buf = (const unsigned char *)views[e].buf + off;
            recs[k].len = len - off < seg ? len - off : seg;
            recs[k++].item = e;
        }
    }
    for (i = 0; i < n; i++) {
        const unsigned char *r = recs[i].buf;
        const char *why;
        rx_record *x = &recs[i];
        x->state = 1;
        if (x->len < HEADER_LEN) continue;
        uint64_t seq = get_be64(r + 16);
        if (get_be64(r + 8) != cid || seq == 0) continue;
        x->pn = seq & PN_MASK;
        int is_new = x->pn > high;
        if (x->pn > high) high = x->pn;        /* later records at or below it take the general path */
        if (!is_new || (seq >> PN_BITS) != epoch || (uint64_t)x->len > max_len || check_record(r, x->len, &why))
            continue;
        x->state = 0;
        x->pos = total;
        total += x->len - HEADER_LEN - TAG_LEN;
    }
    plain = scratch_get(&plaintexts, (size_t)total, &shared);
    if (!plain) { PyErr_NoMemory(); goto done; }
    lock_ctx(self->dec_lock);
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) {
        rx_record *x = &recs[i];
        if (x->state == 0)
            x->state = (signed char)open_record(self->dec, self->iv, x->buf, x->len, get_be64(x->buf + 16), plain + x->pos);
    }
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->dec_lock);
    for (i = 0; i < n; i++)
        if (recs[i].state < 0) liberr = 1;
    if (liberr) { lib_error("open_records"); goto done; }
    result = PyList_New(0);
    if (!result) goto done;
    for (i = 0; i < n;) {
        rx_record *x = &recs[i];
        Py_ssize_t ptlen = x->len - HEADER_LEN - TAG_LEN, len, j, datalen, bytes;
        uint64_t start, off;
        PyObject *item;
        if (x->state != 0) {
            item = segs[x->item] ? PyBytes_FromStringAndSize((const char *)x->buf, x->len)
                                 : Py_NewRef(PySequence_Fast_GET_ITEM(fast, x->item));
        } else if (!simple_stream(plain + x->pos, ptlen, limit, &start, &len)) {
            item = Py_BuildValue("(y#Kn)", (const char *)plain + x->pos, ptlen, (unsigned long long)x->pn, x->len);
        } else {
            datalen = len;
            bytes = x->len;
            off = start + (uint64_t)len;
            for (j = i + 1; j < n; j++) {
                rx_record *y = &recs[j];
                uint64_t o;
                Py_ssize_t l;
                if (y->state != 0 || y->pn != recs[j - 1].pn + 1 ||
                    !simple_stream(plain + y->pos, y->len - HEADER_LEN - TAG_LEN, limit, &o, &l) || o != off)
                    break;
                off += (uint64_t)l;
                datalen += l;
                bytes += y->len;
            }
            PyObject *data = PyBytes_FromStringAndSize(NULL, datalen);
            if (!data) { Py_CLEAR(result); goto done; }
            unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(data);
            for (Py_ssize_t k = i; k < j; k++) {
                Py_ssize_t l = recs[k].len - HEADER_LEN - TAG_LEN - STREAM_FRAME_OVERHEAD;
                memcpy(dst, plain + recs[k].pos + STREAM_FRAME_OVERHEAD, (size_t)l);
                dst += l;
            }
            item = Py_BuildValue("(KnNKn)", (unsigned long long)start, j - i, data, (unsigned long long)x->pn, bytes);
            if (!item || PyList_Append(result, item) < 0) { Py_XDECREF(item); Py_CLEAR(result); goto done; }
            Py_DECREF(item);
            i = j;
            continue;
        }
        if (!item || PyList_Append(result, item) < 0) { Py_XDECREF(item); Py_CLEAR(result); goto done; }
        Py_DECREF(item);
        i++;
    }
done:
    if (plain) scratch_put(&plaintexts, plain, shared);   /* plaintext the caller gets anyway: no cleanse */
    PyMem_Free(recs);
    if (views) {
        for (i = 0; i < nviews; i++) PyBuffer_Release(&views[i]);
        PyMem_Free(views);
    }
    PyMem_Free(segs);
    Py_XDECREF(fast);
    return result;
}
