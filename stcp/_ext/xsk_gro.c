/*
 * stcp._xsk, receive batches: what recv() hands the datapath for the frames it took off the
 * RX ring, in the shape UDP GRO gives the socket datapath (stcp._udpio.recvmmsg(gro=True)),
 * so the AF_XDP datapath takes the same receive path (stcp._demux.group_by_cid, then
 * RecordCipher.open_records) per 64 KB instead of per datagram.
 *
 * Consecutive datagrams of one flow (the same Ethernet, VLAN, IP and UDP headers) are
 * joined into one entry (buffer, addr, segment_size) as GRO joins them: every datagram the
 * size of the first but the last, which may be shorter and ends the entry; at most
 * RX_GRO_MAX datagrams and STCP's largest UDP payload in all.  A single datagram stays
 * (payload, addr).  A datagram that is itself a batch of records (a GSO buffer that
 * generic XDP passed whole, bpf/stcp_xdp.c batch_ok) is an entry of its own, cut where its
 * first record's length field says.  Nothing is trusted: the segment size only says where
 * the receive path looks for record headers, and it checks every one.
 *
 * stcp.datapath.afxdp.rx_entries is the pure-Python reference; tests/test_afxdp.py runs
 * random frame sequences through both (parse_frames() here) and compares.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <stdint.h>

#include "xsk_gro.h"

#define RECORD_HEADER 24            /* length:u64 | cid:u64 | seq:u64 (stcp/wire.py) */
#define RECORD_MIN (RECORD_HEADER + 16)   /* a header and an AEAD tag */
#define MAX_UDP_PAYLOAD 65507

static uint64_t be64(const uint8_t *p) {
    uint64_t v = 0;
    int i;
    for (i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

/* The segment size of a datagram that holds several records back to back: its first
 * record's size when that is shorter than the datagram (and at least a header and a tag);
 * 0 for anything else. */
static uint32_t batch_segment(const uint8_t *payload, uint32_t payload_len) {
    uint64_t length;
    if (payload_len < RECORD_MIN) return 0;
    length = be64(payload);
    if (length >= (uint64_t)payload_len - RECORD_HEADER) return 0;
    if (length + RECORD_HEADER < RECORD_MIN) return 0;
    return (uint32_t)length + RECORD_HEADER;
}

/* Same sender, same receiver, same link headers: what makes datagrams one flow here and
 * gives them one address object and one reply template. */
static int same_flow(const struct parsed *a, const struct parsed *b) {
    return a->family == b->family && a->sport == b->sport && a->dport == b->dport &&
           memcmp(a->src, b->src, 16) == 0 && memcmp(a->dst, b->dst, 16) == 0 &&
           a->vlan_tci == b->vlan_tci && a->vlan_proto == b->vlan_proto &&
           memcmp(a->macs, b->macs, 12) == 0;
}

void rx_batch_init(rx_batch *b, int v4mapped, unsigned int ifindex, int templates, int gro) {
    memset(b, 0, sizeof(*b));
    b->v4mapped = v4mapped;
    b->ifindex = ifindex;
    b->want_templates = templates;
    b->gro = gro;
}

void rx_batch_abort(rx_batch *b) {
    Py_CLEAR(b->result);
    Py_CLEAR(b->templates);
    Py_CLEAR(b->addr);
    Py_CLEAR(b->last_addr);
    b->count = 0;
}

/* Append the entry (buf, addr[, seg]); steals buf. */
static int emit_bytes(rx_batch *b, PyObject *addr, PyObject *buf, uint32_t seg) {
    PyObject *item = seg ? Py_BuildValue("(NOI)", buf, addr, seg) : Py_BuildValue("(NO)", buf, addr);
    if (!item) return -1;
    if (PyList_Append(b->result, item) < 0) { Py_DECREF(item); return -1; }
    Py_DECREF(item);
    return 0;
}

/* Append one entry: the open entry's pieces, or (when pieces is NULL) one payload. */
static int emit(rx_batch *b, PyObject *addr, const uint8_t *one, uint32_t one_len, uint32_t seg) {
    PyObject *buf;
    if (one) {
        buf = PyBytes_FromStringAndSize((const char *)one, one_len);
    } else {
        uint8_t *dst;
        uint32_t i;
        buf = PyBytes_FromStringAndSize(NULL, b->total);
        if (!buf) return -1;
        dst = (uint8_t *)PyBytes_AS_STRING(buf);
        for (i = 0; i < b->count; i++) {
            memcpy(dst, b->ptr[i], b->len[i]);
            dst += b->len[i];
        }
    }
    if (!buf) return -1;
    return emit_bytes(b, addr, buf, seg);
}

/* Close the open entry, if any. */
static int flush(rx_batch *b) {
    int rc = 0;
    if (b->count)
        rc = emit(b, b->addr, NULL, 0, b->count > 1 ? b->seg : 0);
    b->count = 0;
    Py_CLEAR(b->addr);
    return rc;
}

/* The sender's address object (and its reply template): reused while the flow stays. */
static PyObject *address(rx_batch *b, const struct parsed *p) {
    if (!b->last_addr || !same_flow(p, &b->last)) {
        PyObject *a = make_addr(p, b->v4mapped, b->ifindex);
        if (!a) return NULL;
        Py_XSETREF(b->last_addr, a);
        b->last = *p;
        if (b->want_templates) {
            PyObject *t = reply_template(p);
            if (!t || PyDict_SetItem(b->templates, a, t) < 0) { Py_XDECREF(t); return NULL; }
            Py_DECREF(t);
        }
    }
    return b->last_addr;
}

static int start(rx_batch *b) {
    if (!b->result) {
        b->result = PyList_New(0);
        if (!b->result) return -1;
        if (b->want_templates && !(b->templates = PyDict_New())) return -1;
    }
    return 0;
}

int rx_batch_add_pieces(rx_batch *b, const struct parsed *p, const uint8_t *const *piece, const uint32_t *len,
                        uint32_t count, uint32_t skip) {
    PyObject *addr, *payload;
    uint8_t *dst;
    uint32_t k, left = p->payload_len;
    if (start(b) < 0 || !(addr = address(b, p)) || flush(b) < 0) return -1;
    payload = PyBytes_FromStringAndSize(NULL, p->payload_len);
    if (!payload) return -1;
    dst = (uint8_t *)PyBytes_AS_STRING(payload);
    for (k = 0; k < count && left; k++) {
        uint32_t c;
        if (skip >= len[k]) { skip -= len[k]; continue; }
        c = len[k] - skip < left ? len[k] - skip : left;
        memcpy(dst, piece[k] + skip, c);
        dst += c;
        left -= c;
        skip = 0;
    }
    if (left) memset(dst, 0, left);       /* the parser saw to it that the pieces hold it all */
    return emit_bytes(b, addr, payload, batch_segment((const uint8_t *)PyBytes_AS_STRING(payload),
                                                      p->payload_len));
}

int rx_batch_add(rx_batch *b, const struct parsed *p, int stable) {
    PyObject *addr;
    uint32_t seg;
    if (start(b) < 0) return -1;
    addr = address(b, p);
    if (!addr) return -1;
    seg = batch_segment(p->payload, p->payload_len);
    if (seg || !stable || !b->gro) {      /* an entry of its own */
        if (flush(b) < 0) return -1;
        return emit(b, addr, p->payload, p->payload_len, seg);
    }
    if (b->count && !b->closed && b->count < RX_GRO_MAX && p->payload_len <= b->seg &&
        b->total + p->payload_len <= MAX_UDP_PAYLOAD && same_flow(p, &b->flow)) {
        b->ptr[b->count] = p->payload;
        b->len[b->count++] = p->payload_len;
        b->total += p->payload_len;
        b->closed = p->payload_len < b->seg;     /* a shorter one ends it, as in GRO */
        return 0;
    }
    if (flush(b) < 0) return -1;
    b->flow = *p;
    b->addr = Py_NewRef(addr);
    b->seg = p->payload_len;
    b->total = p->payload_len;
    b->closed = p->payload_len == 0;
    b->ptr[0] = p->payload;
    b->len[0] = p->payload_len;
    b->count = 1;
    return 0;
}

PyObject *rx_batch_finish(rx_batch *b) {
    PyObject *out;
    if (!b->result && !(b->result = PyList_New(0))) return NULL;
    if (b->want_templates && !b->templates && !(b->templates = PyDict_New())) { rx_batch_abort(b); return NULL; }
    if (flush(b) < 0) { rx_batch_abort(b); return NULL; }
    if (!b->want_templates) {
        out = Py_NewRef(b->result);
    } else {
        out = PyTuple_Pack(2, b->result, b->templates);
    }
    rx_batch_abort(b);              /* releases what the batch held; out keeps the entries */
    return out;
}

/* parse_frames(frames, v4mapped=False, ifindex=0, templates=False, gro=True): what recv()
 * returns for these whole frames taken off the ring in this order (malformed ones skipped,
 * as recv() skips and counts them). */
static PyObject *xsk_parse_frames(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"frames", "v4mapped", "ifindex", "templates", "gro", NULL};
    PyObject *frames, *fast, *out;
    int v4mapped = 0, templates = 0, gro = 1;
    unsigned int ifindex = 0;
    Py_buffer *views;
    Py_ssize_t n, i, got = 0;
    rx_batch b;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|pIpp:parse_frames", kwlist, &frames, &v4mapped, &ifindex,
                                     &templates, &gro))
        return NULL;
    fast = PySequence_Fast(frames, "parse_frames() takes a sequence of frames");
    if (!fast) return NULL;
    n = PySequence_Fast_GET_SIZE(fast);
    views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    if (!views) { Py_DECREF(fast); return PyErr_NoMemory(); }
    rx_batch_init(&b, v4mapped, ifindex, templates, gro);
    out = NULL;
    for (i = 0; i < n; i++, got++) {
        struct parsed p;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &views[i], PyBUF_SIMPLE) < 0) goto done;
        memset(&p, 0, sizeof(p));
        if (parse_frame_raw(views[i].buf, (size_t)views[i].len, &p)) continue;
        /* the views stay held until the end, as ring frames stay until recv() returns */
        if (rx_batch_add(&b, &p, 1) < 0) { rx_batch_abort(&b); goto done; }
    }
    out = rx_batch_finish(&b);
done:
    for (i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    Py_DECREF(fast);
    return out;
}

PyMethodDef xsk_gro_functions[] = {
    {"parse_frames", (PyCFunction)(void (*)(void))xsk_parse_frames, METH_VARARGS | METH_KEYWORDS,
     "parse_frames(frames, v4mapped=False, ifindex=0, templates=False, gro=True) -> what recv() returns\n"
     "for these frames: [(payload, addr) or (buffer, addr, segment_size)], with templates a pair\n"
     "(entries, {addr: reply template})"},
    {NULL, NULL, 0, NULL},
};
