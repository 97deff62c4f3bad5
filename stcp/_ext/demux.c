/*
 * stcp._demux: the receive side's demultiplexing pass in C, over what a batch receive
 * returned (stcp._udpio.recvmmsg, stcp._xsk.XskSocket.recv): consecutive data records from
 * one address naming one connection ID become one group, so a server looks each
 * connection up once per group, not once per record, and hands the group to
 * RecordCipher.open_records (stcp._aead) whole.
 *
 * Only record headers are read (record.h), and nothing is trusted beyond routing: a group
 * goes to the connection its header names, which authenticates every record itself.
 * stcp/endpoint.py _group_by_cid is the pure-Python reference (tests/test_demux.py checks
 * they agree).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "record.h"

typedef struct {
    PyObject *result;
    PyObject *list;            /* the open group's datagram list (borrowed), or NULL */
    PyObject *addr;            /* its address (borrowed) */
    uint64_t cid;
} grouping;

/* Add one unit (a datagram, or a (buffer, segment_size) pair of data records of one cid) to
 * the open group if it continues it, else as a new group. 0 ok, -1 error. */
static int group_add(grouping *g, PyObject *unit, PyObject *addr, int data_record, uint64_t cid) {
    if (data_record && g->list && cid == g->cid) {
        int same = addr == g->addr;
        if (!same) {
            same = PyObject_RichCompareBool(addr, g->addr, Py_EQ);
            if (same < 0) return -1;
        }
        if (same) return PyList_Append(g->list, unit);
    }
    PyObject *list = PyList_New(1);
    if (!list) return -1;
    PyList_SET_ITEM(list, 0, Py_NewRef(unit));
    PyObject *key = data_record ? PyLong_FromUnsignedLongLong((unsigned long long)cid) : PyLong_FromLong(-1);
    PyObject *group = key ? PyTuple_Pack(3, key, addr, list) : NULL;
    Py_XDECREF(key);
    if (!group || PyList_Append(g->result, group) < 0) { Py_XDECREF(group); Py_DECREF(list); return -1; }
    Py_DECREF(group);
    g->list = data_record ? list : NULL;       /* borrowed: the group in result holds it */
    Py_DECREF(list);
    g->addr = addr;
    g->cid = cid;
    return 0;
}

/* group_by_cid(batch) -> [(cid, addr, [datagram or (buffer, segment_size), ...]), ...]
 *
 * The receive side's demultiplexing pass, over what recvmmsg returned: (datagram, addr), or
 * with GRO (buffer, addr, segment_size). Consecutive data records from one address whose
 * STCP header (length:u64 | cid:u64 | seq:u64) names the same nonzero cid with a nonzero
 * seq form one group, so a server looks each connection up once per group, not once per
 * record. A coalesced buffer whose records all name one cid stays whole, as a (buffer,
 * segment_size) pair: its records are never copied out. Every other datagram (shorter than
 * a header, cid 0, seq 0: client hellos; or a piece of a mixed buffer, copied out) is a
 * group of its own with cid -1, for the caller's per-datagram path. Only header bytes are
 * read; nothing is checked beyond them. */
static PyObject *demux_group_by_cid(PyObject *module, PyObject *batch) {
    PyObject *fast = PySequence_Fast(batch, "group_by_cid() takes a list of (datagram, addr) tuples");
    grouping g = {NULL, NULL, NULL, 0};
    Py_ssize_t n, i;

    if (!fast) return NULL;
    n = PySequence_Fast_GET_SIZE(fast);
    g.result = PyList_New(0);
    if (!g.result) goto fail;
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i), *data, *addr;
        Py_ssize_t seg = 0;
        uint64_t cid = 0, seq;
        Py_buffer view;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 2 || PyTuple_GET_SIZE(item) > 3) {
            PyErr_SetString(PyExc_TypeError, "group_by_cid() items must be (datagram, addr) or "
                            "(buffer, addr, segment_size) tuples");
            goto fail;
        }
        data = PyTuple_GET_ITEM(item, 0);
        addr = PyTuple_GET_ITEM(item, 1);
        if (PyTuple_GET_SIZE(item) == 3) {
            seg = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 2));
            if (seg == -1 && PyErr_Occurred()) goto fail;
        }
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) != 0) goto fail;
        const unsigned char *p = view.buf;
        int rc = 0;
        if (seg <= 0 || seg >= view.len) {                  /* one datagram */
            int dr = data_record_header(p, view.len, &cid, &seq);
            rc = group_add(&g, data, addr, dr, cid);
        } else {
            uint64_t first = 0, c = 0;
            int whole = data_record_header(p, seg, &first, &seq);
            for (Py_ssize_t off = seg; whole && off < view.len; off += seg) {
                Py_ssize_t len = view.len - off < seg ? view.len - off : seg;
                whole = data_record_header(p + off, len, &c, &seq) && c == first;
            }
            if (whole) {
                PyObject *pair = Py_BuildValue("(On)", data, seg);
                rc = pair ? group_add(&g, pair, addr, 1, first) : -1;
                Py_XDECREF(pair);
            } else {
                for (Py_ssize_t off = 0; rc == 0 && off < view.len; off += seg) {
                    Py_ssize_t len = view.len - off < seg ? view.len - off : seg;
                    PyObject *piece = PyBytes_FromStringAndSize((const char *)p + off, len);
                    int dr = data_record_header(p + off, len, &c, &seq);
                    rc = piece ? group_add(&g, piece, addr, dr, c) : -1;
                    Py_XDECREF(piece);
                }
            }
        }
        PyBuffer_Release(&view);
        if (rc < 0) goto fail;
    }
    Py_DECREF(fast);
    return g.result;
fail:
    Py_XDECREF(g.result);
    Py_DECREF(fast);
    return NULL;
}

static PyMethodDef demux_methods[] = {
    {"group_by_cid", (PyCFunction)demux_group_by_cid, METH_O,
     "group_by_cid(batch) -> list[(cid, addr, datagrams)]: consecutive data records from one address\n"
     "naming one connection ID grouped (a GRO buffer of one cid's records kept whole as a\n"
     "(buffer, segment_size) pair); any other datagram alone, with cid -1."},
    {NULL}
};

static struct PyModuleDef demux_module = {
    PyModuleDef_HEAD_INIT, "stcp._demux",
    "A receive batch grouped by the connection ID in each record's header (see stcp/endpoint.py).", -1,
    demux_methods,
};

PyMODINIT_FUNC PyInit__demux(void) {
    return PyModule_Create(&demux_module);
}
