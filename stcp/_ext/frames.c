/*
 * stcp._frames: the frames of a request/response record in C (docs/PROTOCOL.md section 7).
 *
 * A small message and its echo each take one record holding an ACK, a STREAM frame, or an
 * ACK then a STREAM frame. The send path builds that plaintext here in one allocation
 * (encode_ack_stream) and the receive path parses it here (decode_ack_stream) without
 * frame objects; anything else is left to the general paths of stcp/send.py and
 * stcp/receive.py. stcp.wire.encode_ack_stream_ref and decode_ack_stream_ref are the
 * pure-Python references (tests/test_frames_ext.py and the `frames` fuzz target check they
 * agree, errors included).
 *
 * decode_ack_stream reads a record's authenticated plaintext, but the peer is still
 * hostile: every read is bounds-checked first, and what it allocates is bounded by the
 * plaintext (at most MAX_ACK_RANGES range tuples and one copy of the stream data).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define FRAME_ACK 0x02
#define FRAME_STREAM 0x03
#define STREAM_FLAG_FIN 0x01
#define MAX_ACK_RANGES 64
#define ACK_HEADER_LEN 23          /* type u8, largest u64, delay_us u32, range_count u16, first_range u64 */
#define ACK_RANGE_LEN 16           /* gap u64, length u64 */
#define STREAM_HEADER_LEN 12       /* type u8, flags u8, offset u64, length u16 */
#define MAX_STREAM_DATA 0xFFFF

static PyObject *protocol_violation;   /* stcp.errors.ProtocolViolation, what stcp.wire raises */

static uint64_t get_be64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static void put_be64(uint8_t *p, uint64_t v) {
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static PyObject *range_pair(uint64_t low, uint64_t high) {
    PyObject *lo = PyLong_FromUnsignedLongLong(low), *hi = lo ? PyLong_FromUnsignedLongLong(high) : NULL;
    PyObject *pair = hi ? PyTuple_Pack(2, lo, hi) : NULL;
    Py_XDECREF(lo);
    Py_XDECREF(hi);
    return pair;
}

/* The ACK frame at p[0] (p[0] == FRAME_ACK): its ranges as a tuple of (low, high), highest
 * first, with *delay and *pos (the position after it) set; NULL with ProtocolViolation set
 * where stcp.wire.decode_ack raises it, in the same order and with the same words. */
static PyObject *decode_ack(const uint8_t *p, size_t end, uint32_t *delay, size_t *pos) {
    if (end < ACK_HEADER_LEN) {
        PyErr_SetString(protocol_violation, "frame truncated");
        return NULL;
    }
    uint64_t largest = get_be64(p + 1);
    *delay = ((uint32_t)p[9] << 24) | ((uint32_t)p[10] << 16) | ((uint32_t)p[11] << 8) | p[12];
    unsigned count = ((unsigned)p[13] << 8) | p[14];
    uint64_t first = get_be64(p + 15);
    if (count >= MAX_ACK_RANGES) {
        PyErr_Format(protocol_violation, "ack frame has %u ranges, at most %d allowed", count + 1, MAX_ACK_RANGES);
        return NULL;
    }
    if (first > largest) {
        PyErr_SetString(protocol_violation, "ack range below packet number 0");
        return NULL;
    }
    PyObject *ranges = PyTuple_New((Py_ssize_t)count + 1);      /* at most MAX_ACK_RANGES */
    if (!ranges)
        return NULL;
    uint64_t low = largest - first;
    PyObject *pair = range_pair(low, largest);
    if (!pair)
        goto fail;
    PyTuple_SET_ITEM(ranges, 0, pair);
    size_t at = ACK_HEADER_LEN;
    for (unsigned i = 1; i <= count; i++) {
        if (end - at < ACK_RANGE_LEN) {
            PyErr_SetString(protocol_violation, "frame truncated");
            goto fail;
        }
        uint64_t gap = get_be64(p + at), length = get_be64(p + at + 8);
        at += ACK_RANGE_LEN;
        /* high = low - gap - 2 and low' = high - length, both must stay >= 0 */
        if (low < 2 || gap > low - 2 || length > low - 2 - gap) {
            PyErr_SetString(protocol_violation, "ack range below packet number 0");
            goto fail;
        }
        uint64_t high = low - 2 - gap;
        low = high - length;
        if (!(pair = range_pair(low, high)))
            goto fail;
        PyTuple_SET_ITEM(ranges, i, pair);
    }
    *pos = at;
    return ranges;
fail:
    Py_DECREF(ranges);
    return NULL;
}

/* decode_ack_stream(plaintext) -> (ranges, delay_us, offset, data, fin) or None */
static PyObject *decode_ack_stream(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *p = b.buf;
    size_t end = (size_t)b.len, pos = 0;
    uint32_t delay = 0;
    PyObject *ranges = NULL, *result = NULL;
    if (end && p[0] == FRAME_ACK) {
        if (!(ranges = decode_ack(p, end, &delay, &pos)))
            goto done;
        if (pos == end) {
            result = Py_BuildValue("(OkiOO)", ranges, (unsigned long)delay, 0, Py_None, Py_False);
            goto done;
        }
    }
    if (end - pos < STREAM_HEADER_LEN || p[pos] != FRAME_STREAM)
        goto decline;
    unsigned flags = p[pos + 1];
    uint64_t offset = get_be64(p + pos + 2);
    size_t length = ((size_t)p[pos + 10] << 8) | p[pos + 11];
    size_t start = pos + STREAM_HEADER_LEN;
    if (flags > STREAM_FLAG_FIN || length != end - start)
        goto decline;
    PyObject *data = PyBytes_FromStringAndSize((const char *)p + start, (Py_ssize_t)length);
    PyObject *off = data ? PyLong_FromUnsignedLongLong(offset) : NULL;
    if (off)
        result = Py_BuildValue("(OkOOO)", ranges ? ranges : Py_None, (unsigned long)delay, off, data,
                               flags ? Py_True : Py_False);
    Py_XDECREF(off);
    Py_XDECREF(data);
    goto done;
decline:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(ranges);
    PyBuffer_Release(&b);
    return result;
}

/* A Python int in 0..2^64-1, else ValueError(what) (TypeError for a non-int). */
static int get_u64(PyObject *o, uint64_t *out, const char *what) {
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s: an int is needed, not %.100s", what, Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, what);
        return -1;
    }
    *out = v;
    return 0;
}

static const char BAD_RANGES[] = "ack ranges must be (low, high) pairs in 0..2^64-1, highest first, "
                                 "neither overlapping nor adjacent";

/* encode_ack_stream(ranges, delay_us, offset, data) -> bytes */
static PyObject *encode_ack_stream(PyObject *self, PyObject *args) {
    PyObject *ranges_o, *delay_o, *offset_o, *data_o;
    if (!PyArg_ParseTuple(args, "OOOO:encode_ack_stream", &ranges_o, &delay_o, &offset_o, &data_o))
        return NULL;
    uint64_t lows[MAX_ACK_RANGES], highs[MAX_ACK_RANGES];
    Py_ssize_t n = 0;
    if (ranges_o != Py_None) {
        PyObject *seq = PySequence_Fast(ranges_o, "ack ranges must be a sequence");
        if (!seq)
            return NULL;
        n = PySequence_Fast_GET_SIZE(seq);
        if (n > MAX_ACK_RANGES)
            n = MAX_ACK_RANGES;        /* the newest MAX_ACK_RANGES, as encode_ack keeps them */
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *pair = PySequence_Fast_GET_ITEM(seq, i);
            if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
                PyErr_SetString(PyExc_ValueError, BAD_RANGES);
                Py_DECREF(seq);
                return NULL;
            }
            if (get_u64(PyTuple_GET_ITEM(pair, 0), &lows[i], BAD_RANGES) < 0
                    || get_u64(PyTuple_GET_ITEM(pair, 1), &highs[i], BAD_RANGES) < 0) {
                Py_DECREF(seq);
                return NULL;
            }
            if (lows[i] > highs[i] || (i && (lows[i - 1] < 2 || highs[i] > lows[i - 1] - 2))) {
                PyErr_SetString(PyExc_ValueError, BAD_RANGES);
                Py_DECREF(seq);
                return NULL;
            }
        }
        Py_DECREF(seq);
    }
    if (!PyLong_Check(delay_o)) {
        PyErr_Format(PyExc_TypeError, "ack delay: an int is needed, not %.100s", Py_TYPE(delay_o)->tp_name);
        return NULL;
    }
    int overflow = 0;
    long long delay_ll = PyLong_AsLongLongAndOverflow(delay_o, &overflow);
    if (delay_ll == -1 && PyErr_Occurred())
        return NULL;
    if (overflow < 0 || (!overflow && delay_ll < 0)) {
        PyErr_SetString(PyExc_ValueError, "ack delay must not be negative");
        return NULL;
    }
    uint32_t delay = overflow || delay_ll > 0xFFFFFFFFLL ? 0xFFFFFFFFu : (uint32_t)delay_ll;
    uint64_t offset = 0;
    Py_buffer data = {0};
    int has_data = data_o != Py_None;
    if (has_data) {
        if (get_u64(offset_o, &offset, "stream offset must be in 0..2^64-1") < 0)
            return NULL;
        if (PyObject_GetBuffer(data_o, &data, PyBUF_SIMPLE) < 0)
            return NULL;
        if (data.len > MAX_STREAM_DATA) {
            PyBuffer_Release(&data);
            PyErr_SetString(PyExc_ValueError, "stream frame data longer than 65535 bytes");
            return NULL;
        }
    }
    size_t total = (n ? ACK_HEADER_LEN + (size_t)(n - 1) * ACK_RANGE_LEN : 0)
                   + (has_data ? STREAM_HEADER_LEN + (size_t)data.len : 0);
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!out) {
        if (has_data)
            PyBuffer_Release(&data);
        return NULL;
    }
    uint8_t *w = (uint8_t *)PyBytes_AS_STRING(out);
    if (n) {
        w[0] = FRAME_ACK;
        put_be64(w + 1, highs[0]);
        w[9] = (uint8_t)(delay >> 24); w[10] = (uint8_t)(delay >> 16);
        w[11] = (uint8_t)(delay >> 8); w[12] = (uint8_t)delay;
        w[13] = (uint8_t)((n - 1) >> 8); w[14] = (uint8_t)(n - 1);
        put_be64(w + 15, highs[0] - lows[0]);
        w += ACK_HEADER_LEN;
        for (Py_ssize_t i = 1; i < n; i++, w += ACK_RANGE_LEN) {
            put_be64(w, lows[i - 1] - highs[i] - 2);
            put_be64(w + 8, highs[i] - lows[i]);
        }
    }
    if (has_data) {
        w[0] = FRAME_STREAM;
        w[1] = 0;
        put_be64(w + 2, offset);
        w[10] = (uint8_t)(data.len >> 8);
        w[11] = (uint8_t)data.len;
        if (data.len)
            memcpy(w + STREAM_HEADER_LEN, data.buf, (size_t)data.len);
        PyBuffer_Release(&data);
    }
    return out;
}

static PyMethodDef frames_methods[] = {
    {"decode_ack_stream", decode_ack_stream, METH_O,
     "decode_ack_stream(plaintext) -> (ranges, delay_us, offset, data, fin) or None"},
    {"encode_ack_stream", encode_ack_stream, METH_VARARGS,
     "encode_ack_stream(ranges, delay_us, offset, data) -> bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef frames_module = {
    PyModuleDef_HEAD_INIT, "stcp._frames",
    "The ACK and STREAM frames of a request/response record (see stcp/wire.py).", -1, frames_methods,
};

PyMODINIT_FUNC PyInit__frames(void) {
    PyObject *errors = PyImport_ImportModule("stcp.errors");
    if (!errors)
        return NULL;
    protocol_violation = PyObject_GetAttrString(errors, "ProtocolViolation");
    Py_DECREF(errors);
    if (!protocol_violation)
        return NULL;
    PyObject *m = PyModule_Create(&frames_module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "FRAME_ACK", FRAME_ACK) < 0
            || PyModule_AddIntConstant(m, "FRAME_STREAM", FRAME_STREAM) < 0
            || PyModule_AddIntConstant(m, "MAX_ACK_RANGES", MAX_ACK_RANGES) < 0
            || PyModule_AddIntConstant(m, "STREAM_FRAME_OVERHEAD", STREAM_HEADER_LEN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
