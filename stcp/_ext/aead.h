/*
 * What the files of stcp._aead share: the RecordCipher object, the one-record EVP calls
 * (aead.c) and the argument helpers.  aead.c is the type and one record at a time,
 * aead_send.c the bulk send (seal_stream), aead_receive.c the bulk receive (open_records).
 */
#ifndef STCP_AEAD_H
#define STCP_AEAD_H

#include <Python.h>
#include <pythread.h>
#include <stdint.h>
#include <openssl/evp.h>

#include "record.h"

#define IV_LEN 12

typedef struct {
    PyObject_HEAD
    int suite;
    unsigned char iv[IV_LEN];
    EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
    PyThread_type_lock enc_lock;     /* a context is used by one thread at a time */
    PyThread_type_lock dec_lock;
} RecordCipher;

/* aead.c: seal one record whose plaintext is a || b into out (HEADER_LEN + alen + blen +
 * TAG_LEN bytes); two pieces, so a frame header and the data it frames need not be copied
 * together first. No Python calls (safe without the GIL). 0 = ok, -1 = library error. */
int seal_record(EVP_CIPHER_CTX *ctx, const unsigned char *iv, uint64_t cid, uint64_t seq,
                const unsigned char *a, Py_ssize_t alen, const unsigned char *b, Py_ssize_t blen,
                unsigned char *out);

/* aead.c: open one record that passed check_record into out (len - HEADER_LEN - TAG_LEN
 * bytes), the nonce made from seq. No Python calls. 0 ok, 1 authentication failure (out
 * wiped), -1 library error. */
int open_record(EVP_CIPHER_CTX *ctx, const unsigned char *iv, const unsigned char *rec, Py_ssize_t len,
                uint64_t seq, unsigned char *out);

/* aead_send.c */
PyObject *RecordCipher_seal_stream(RecordCipher *self, PyObject *const *args, Py_ssize_t nargs);

/* aead_receive.c; aead_receive_init() once when the module loads (0 ok, -1 out of memory) */
PyObject *RecordCipher_open_records(RecordCipher *self, PyObject *const *args, Py_ssize_t nargs);
int aead_receive_init(void);

/* Take a context's lock; if another thread holds it, wait with the GIL released. */
static inline void lock_ctx(PyThread_type_lock lock) {
    if (!PyThread_acquire_lock(lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

/* 1 if the cipher was initialised, else 0 with RuntimeError set. */
static inline int ready(RecordCipher *self) {
    if (!self->enc) {
        PyErr_SetString(PyExc_RuntimeError, "RecordCipher is not initialised");
        return 0;
    }
    return 1;
}

static inline int get_u64(PyObject *o, const char *what, uint64_t *v) {
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be int, not %.100s", what, Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long x = PyLong_AsUnsignedLongLong(o);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_OverflowError, "%s must be in 0..2**64-1", what);
        return -1;
    }
    *v = (uint64_t)x;
    return 0;
}

/* Buffer of a plaintext/record argument: bytes-like, C-contiguous. */
static inline int get_buffer(PyObject *o, Py_buffer *view, const char *what) {
    if (PyObject_GetBuffer(o, view, PyBUF_SIMPLE) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a bytes-like object, not %.100s", what,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    return 0;
}

static inline PyObject *lib_error(const char *what) {
    PyErr_Format(PyExc_RuntimeError, "OpenSSL failed in %s", what);
    return NULL;
}

#endif
