/*
 * stcp._aead, the bulk send: RecordCipher.seal_stream (stcp/crypto.py
 * RecordKey.seal_stream is the reference; tests/test_aead_ext.py checks they agree).
 * Every argument is checked and the output allocated first; then the GIL is released for
 * all the crypto of the run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <stdint.h>

#include "aead.h"

#define MAX_RUN_RECORDS 4096

static inline void put_stream_frame(unsigned char *p, int fin, uint64_t offset, Py_ssize_t len) {
    p[0] = FRAME_STREAM;
    p[1] = fin ? STREAM_FLAG_FIN : 0;
    put_be64(p + 2, offset);
    p[10] = (unsigned char)(len >> 8);
    p[11] = (unsigned char)len;
}

/* The bulk-send hot path: stream bytes cut into records of one STREAM frame each, sealed
 * back to back into one buffer that a UDP GSO send can hand to the kernel whole. Every
 * record but the last carries exactly `chunk` bytes, so every record but the last has the
 * same size (what GSO needs). The caller's data is read once, straight into the cipher,
 * and never modified. */
PyObject *RecordCipher_seal_stream(RecordCipher *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t cid, first, offset;
    Py_ssize_t chunk, n, total, i;
    int fin, rc = 0;
    Py_buffer data = {0};
    PyObject *out = NULL;

    if (!ready(self)) return NULL;
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "seal_stream() takes 6 arguments (cid, first_seq, data, "
                     "stream_offset, chunk, fin), got %zd", nargs);
        return NULL;
    }
    if (get_u64(args[0], "cid", &cid) || get_u64(args[1], "first_seq", &first) ||
        get_u64(args[3], "stream_offset", &offset))
        return NULL;
    chunk = PyLong_AsSsize_t(args[4]);
    if (chunk == -1 && PyErr_Occurred()) return NULL;
    fin = PyObject_IsTrue(args[5]);
    if (fin < 0) return NULL;
    if (chunk < 1 || chunk > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "chunk must be between 1 and 65535 bytes");
        return NULL;
    }
    if (get_buffer(args[2], &data, "data")) return NULL;
    if (data.len < 1) {
        PyErr_SetString(PyExc_ValueError, "data must not be empty");
        goto done;
    }
    n = (data.len + chunk - 1) / chunk;
    if (n > MAX_RUN_RECORDS) {
        PyErr_Format(PyExc_ValueError, "data makes %zd records, at most %d per call", n, MAX_RUN_RECORDS);
        goto done;
    }
    if ((uint64_t)(n - 1) > UINT64_MAX - first) {
        PyErr_SetString(PyExc_OverflowError, "sequence numbers would wrap past 2**64-1");
        goto done;
    }
    if ((uint64_t)data.len > UINT64_MAX - offset) {
        PyErr_SetString(PyExc_OverflowError, "stream offset would wrap past 2**64-1");
        goto done;
    }
    total = data.len + n * (HEADER_LEN + STREAM_FRAME_OVERHEAD + TAG_LEN);
    out = PyBytes_FromStringAndSize(NULL, total);
    if (!out) goto done;
    lock_ctx(self->enc_lock);
    Py_BEGIN_ALLOW_THREADS
    {
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
        const unsigned char *src = data.buf;
        for (i = 0; i < n && rc == 0; i++) {
            Py_ssize_t len = (i == n - 1) ? data.len - i * chunk : chunk;
            unsigned char frame[STREAM_FRAME_OVERHEAD];
            put_stream_frame(frame, fin && i == n - 1, offset + (uint64_t)(i * chunk), len);
            rc = seal_record(self->enc, self->iv, cid, first + (uint64_t)i, frame, STREAM_FRAME_OVERHEAD,
                          src + i * chunk, len, dst);
            dst += HEADER_LEN + STREAM_FRAME_OVERHEAD + len + TAG_LEN;
        }
    }
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->enc_lock);
    if (rc) { Py_CLEAR(out); lib_error("seal_stream"); }
done:
    PyBuffer_Release(&data);
    return out;
}
