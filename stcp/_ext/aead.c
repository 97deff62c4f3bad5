/*
 * stcp._aead: STCP record protection in C (docs/PROTOCOL.md §Record protection).
 *
 * Record = header (length:u64 | cid:u64 | seq:u64, big-endian, 24 bytes)
 *        || AEAD(key, nonce = iv XOR (0^32 || seq_be64), aad = header, plaintext) || tag(16)
 * with length = len(ciphertext) + 16.  stcp/crypto.py RecordKey is the reference.
 *
 * The cipher is OpenSSL's EVP (AES-256-GCM or ChaCha20-Poly1305); no cryptography is
 * done here beyond calling it.  Each RecordCipher keeps one EVP_CIPHER_CTX for sealing
 * and one for opening, initialised once with the key; per record only the IV is set.
 * Batch calls take every buffer first, then release the GIL for all the crypto.  A
 * context is used by one thread at a time (a lock per context), so one RecordCipher may
 * be shared between threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "scratch.h"
#include <pythread.h>
#include <string.h>
#include <stdint.h>
#include <openssl/evp.h>
#include <openssl/crypto.h>
#include <openssl/opensslv.h>

#define HEADER_LEN 24
#define TAG_LEN 16
#define KEY_LEN 32
#define IV_LEN 12
#define SUITE_AES_256_GCM 1
#define SUITE_CHACHA20_POLY1305 2
/* EVP takes int lengths; stay well clear of INT_MAX. */
#define MAX_PLAINTEXT ((Py_ssize_t)0x3FFFFFFF)
/* Single records at least this long release the GIL (small ones cost less than the switch). */
#define GIL_RELEASE_MIN 16384

static PyObject *AuthError;
static scratch_t plaintexts;     /* open_records' plaintexts, kept between calls */

typedef struct {
    PyObject_HEAD
    int suite;
    unsigned char iv[IV_LEN];
    EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
    PyThread_type_lock enc_lock;
    PyThread_type_lock dec_lock;
} RecordCipher;

/* ---- helpers ------------------------------------------------------------------ */

static inline void put_be64(unsigned char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) { p[i] = (unsigned char)v; v >>= 8; }
}

static inline uint64_t get_be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

static inline void make_nonce(const unsigned char *iv, uint64_t seq, unsigned char *nonce) {
    unsigned char s[8];
    put_be64(s, seq);
    memcpy(nonce, iv, 4);
    for (int i = 0; i < 8; i++) nonce[4 + i] = iv[4 + i] ^ s[i];
}

/* Take a context's lock; if another thread holds it, wait with the GIL released. */
static void lock_ctx(PyThread_type_lock lock) {
    if (!PyThread_acquire_lock(lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

/* Seal one record whose plaintext is a || b into out (HEADER_LEN + alen + blen + TAG_LEN
 * bytes): two pieces, so a frame header and the data it frames need not be copied together
 * first. No Python calls. 0 = ok. */
static int seal_two(EVP_CIPHER_CTX *ctx, const unsigned char *iv, uint64_t cid, uint64_t seq,
                    const unsigned char *a, Py_ssize_t alen, const unsigned char *b, Py_ssize_t blen,
                    unsigned char *out) {
    unsigned char nonce[IV_LEN];
    Py_ssize_t ptlen = alen + blen;
    int outl = 0, outl2 = 0, finl = 0;
    put_be64(out, (uint64_t)ptlen + TAG_LEN);
    put_be64(out + 8, cid);
    put_be64(out + 16, seq);
    make_nonce(iv, seq, nonce);
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1) return -1;
    if (EVP_EncryptUpdate(ctx, NULL, &outl, out, HEADER_LEN) != 1) return -1;
    outl = 0;
    if (alen > 0 && EVP_EncryptUpdate(ctx, out + HEADER_LEN, &outl, a, (int)alen) != 1) return -1;
    if (blen > 0 && EVP_EncryptUpdate(ctx, out + HEADER_LEN + outl, &outl2, b, (int)blen) != 1) return -1;
    if (EVP_EncryptFinal_ex(ctx, out + HEADER_LEN + outl + outl2, &finl) != 1) return -1;
    if ((Py_ssize_t)outl + outl2 + finl != ptlen) return -1;
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, out + HEADER_LEN + ptlen) != 1) return -1;
    return 0;
}

/* Seal one record into out (HEADER_LEN + ptlen + TAG_LEN bytes). No Python calls. 0 = ok. */
static int seal_one(EVP_CIPHER_CTX *ctx, const unsigned char *iv, uint64_t cid, uint64_t seq,
                    const unsigned char *pt, Py_ssize_t ptlen, unsigned char *out) {
    return seal_two(ctx, iv, cid, seq, pt, ptlen, NULL, 0, out);
}

/* Check a record's framing: 0 if well formed, else -1 with *why set. */
static int check_record(const unsigned char *rec, Py_ssize_t len, const char **why) {
    if (len < HEADER_LEN + TAG_LEN) {
        *why = "record shorter than header and tag";
        return -1;
    }
    if (len - HEADER_LEN > MAX_PLAINTEXT + TAG_LEN) {
        *why = "record too large";
        return -1;
    }
    if (get_be64(rec) != (uint64_t)(len - HEADER_LEN)) {
        *why = "length field does not match the record's size";
        return -1;
    }
    return 0;
}

/* Open one well-formed record into out (len - HEADER_LEN - TAG_LEN bytes).
 * Returns 0 ok, 1 authentication failure, -1 library error. No Python calls. */
static int open_one(EVP_CIPHER_CTX *ctx, const unsigned char *iv, const unsigned char *rec,
                    Py_ssize_t len, uint64_t seq, unsigned char *out) {
    unsigned char nonce[IV_LEN], tag[TAG_LEN];
    Py_ssize_t ctlen = len - HEADER_LEN - TAG_LEN;
    int outl = 0, finl = 0;
    make_nonce(iv, seq, nonce);
    memcpy(tag, rec + HEADER_LEN + ctlen, TAG_LEN);
    if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1) return -1;
    if (EVP_DecryptUpdate(ctx, NULL, &outl, rec, HEADER_LEN) != 1) return -1;
    outl = 0;
    if (ctlen > 0 && EVP_DecryptUpdate(ctx, out, &outl, rec + HEADER_LEN, (int)ctlen) != 1) return -1;
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, tag) != 1) return -1;
    if (EVP_DecryptFinal_ex(ctx, out + outl, &finl) != 1) {
        OPENSSL_cleanse(out, (size_t)ctlen);
        return 1;
    }
    return 0;
}

static int get_u64(PyObject *o, const char *what, uint64_t *v) {
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
static int get_buffer(PyObject *o, Py_buffer *view, const char *what) {
    if (PyObject_GetBuffer(o, view, PyBUF_SIMPLE) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a bytes-like object, not %.100s", what,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    return 0;
}

static PyObject *lib_error(const char *what) {
    PyErr_Format(PyExc_RuntimeError, "OpenSSL failed in %s", what);
    return NULL;
}

/* ---- type ---------------------------------------------------------------------- */

static void RecordCipher_dealloc(RecordCipher *self) {
    if (self->enc) EVP_CIPHER_CTX_free(self->enc);
    if (self->dec) EVP_CIPHER_CTX_free(self->dec);
    if (self->enc_lock) PyThread_free_lock(self->enc_lock);
    if (self->dec_lock) PyThread_free_lock(self->dec_lock);
    OPENSSL_cleanse(self->iv, IV_LEN);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int RecordCipher_init(RecordCipher *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"suite", "key", "iv", NULL};
    int suite;
    Py_buffer key = {0}, iv = {0};
    const EVP_CIPHER *cipher;
    int rc = -1;

    if (self->enc) {
        PyErr_SetString(PyExc_RuntimeError, "RecordCipher is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iy*y*:RecordCipher", kwlist, &suite, &key, &iv))
        return -1;
    if (suite == SUITE_AES_256_GCM) cipher = EVP_aes_256_gcm();
    else if (suite == SUITE_CHACHA20_POLY1305) cipher = EVP_chacha20_poly1305();
    else {
        PyErr_Format(PyExc_ValueError, "unsupported cipher suite 0x%02x", suite);
        goto done;
    }
    if (key.len != KEY_LEN) {
        PyErr_Format(PyExc_ValueError, "key must be %d bytes, got %zd", KEY_LEN, key.len);
        goto done;
    }
    if (iv.len != IV_LEN) {
        PyErr_Format(PyExc_ValueError, "iv must be %d bytes, got %zd", IV_LEN, iv.len);
        goto done;
    }
    if (cipher == NULL) { lib_error("cipher lookup"); goto done; }
    self->enc_lock = PyThread_allocate_lock();
    self->dec_lock = PyThread_allocate_lock();
    self->enc = EVP_CIPHER_CTX_new();
    self->dec = EVP_CIPHER_CTX_new();
    if (!self->enc_lock || !self->dec_lock || !self->enc || !self->dec) {
        PyErr_NoMemory();
        goto done;
    }
    /* 12 bytes is both ciphers' default IV length; key set once here, IV per record. */
    if (EVP_EncryptInit_ex(self->enc, cipher, NULL, (const unsigned char *)key.buf, NULL) != 1 ||
        EVP_DecryptInit_ex(self->dec, cipher, NULL, (const unsigned char *)key.buf, NULL) != 1 ||
        EVP_CIPHER_CTX_iv_length(self->enc) != IV_LEN) {
        lib_error("key setup");
        goto done;
    }
    memcpy(self->iv, iv.buf, IV_LEN);
    self->suite = suite;
    rc = 0;
done:
    if (rc != 0) {
        if (self->enc) { EVP_CIPHER_CTX_free(self->enc); self->enc = NULL; }
        if (self->dec) { EVP_CIPHER_CTX_free(self->dec); self->dec = NULL; }
    }
    if (key.obj) PyBuffer_Release(&key);
    if (iv.obj) PyBuffer_Release(&iv);
    return rc;
}

static int ready(RecordCipher *self) {
    if (!self->enc) {
        PyErr_SetString(PyExc_RuntimeError, "RecordCipher is not initialised");
        return 0;
    }
    return 1;
}

static PyObject *RecordCipher_seal(RecordCipher *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t cid, seq;
    Py_buffer pt;
    PyObject *out;
    int rc;

    if (!ready(self)) return NULL;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "seal() takes 3 arguments (cid, seq, plaintext), got %zd", nargs);
        return NULL;
    }
    if (get_u64(args[0], "cid", &cid) || get_u64(args[1], "seq", &seq)) return NULL;
    if (get_buffer(args[2], &pt, "plaintext")) return NULL;
    if (pt.len > MAX_PLAINTEXT) {
        PyBuffer_Release(&pt);
        PyErr_SetString(PyExc_ValueError, "plaintext too large");
        return NULL;
    }
    out = PyBytes_FromStringAndSize(NULL, HEADER_LEN + pt.len + TAG_LEN);
    if (!out) { PyBuffer_Release(&pt); return NULL; }
    lock_ctx(self->enc_lock);
    if (pt.len >= GIL_RELEASE_MIN) {
        Py_BEGIN_ALLOW_THREADS
        rc = seal_one(self->enc, self->iv, cid, seq, pt.buf, pt.len, (unsigned char *)PyBytes_AS_STRING(out));
        Py_END_ALLOW_THREADS
    } else {
        rc = seal_one(self->enc, self->iv, cid, seq, pt.buf, pt.len, (unsigned char *)PyBytes_AS_STRING(out));
    }
    PyThread_release_lock(self->enc_lock);
    PyBuffer_Release(&pt);
    if (rc) { Py_DECREF(out); return lib_error("seal"); }
    return out;
}

static PyObject *RecordCipher_open(RecordCipher *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer rec;
    PyObject *out;
    const char *why = NULL;
    uint64_t seq;
    int rc;

    if (!ready(self)) return NULL;
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "open() takes 1 or 2 arguments (record[, seq]), got %zd", nargs);
        return NULL;
    }
    if (get_buffer(args[0], &rec, "record")) return NULL;
    if (check_record(rec.buf, rec.len, &why)) {
        PyBuffer_Release(&rec);
        PyErr_SetString(PyExc_ValueError, why);
        return NULL;
    }
    seq = get_be64((const unsigned char *)rec.buf + 16);
    if (nargs == 2 && args[1] != Py_None) {
        /* the nonce's seq, when the caller has it apart from the header (RecordKey.open) */
        if (get_u64(args[1], "seq", &seq)) { PyBuffer_Release(&rec); return NULL; }
    }
    out = PyBytes_FromStringAndSize(NULL, rec.len - HEADER_LEN - TAG_LEN);
    if (!out) { PyBuffer_Release(&rec); return NULL; }
    lock_ctx(self->dec_lock);
    if (rec.len >= GIL_RELEASE_MIN) {
        Py_BEGIN_ALLOW_THREADS
        rc = open_one(self->dec, self->iv, rec.buf, rec.len, seq, (unsigned char *)PyBytes_AS_STRING(out));
        Py_END_ALLOW_THREADS
    } else {
        rc = open_one(self->dec, self->iv, rec.buf, rec.len, seq, (unsigned char *)PyBytes_AS_STRING(out));
    }
    PyThread_release_lock(self->dec_lock);
    PyBuffer_Release(&rec);
    if (rc) {
        Py_DECREF(out);
        if (rc > 0) PyErr_SetString(AuthError, "record failed authentication");
        else lib_error("open");
        return NULL;
    }
    return out;
}

/* Buffers of every item of a list/tuple; returns count or -1. *views is PyMem-allocated. */
static Py_ssize_t get_buffers(PyObject *seqobj, PyObject **fast, Py_buffer **views, const char *what) {
    Py_ssize_t n, i;
    *fast = PySequence_Fast(seqobj, "expected a list or tuple of bytes-like objects");
    if (!*fast) return -1;
    n = PySequence_Fast_GET_SIZE(*fast);
    *views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    if (!*views) { Py_CLEAR(*fast); PyErr_NoMemory(); return -1; }
    for (i = 0; i < n; i++) {
        if (get_buffer(PySequence_Fast_GET_ITEM(*fast, i), &(*views)[i], what)) {
            while (--i >= 0) PyBuffer_Release(&(*views)[i]);
            PyMem_Free(*views);
            *views = NULL;
            Py_CLEAR(*fast);
            return -1;
        }
    }
    return n;
}

static void release_buffers(PyObject *fast, Py_buffer *views, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    Py_XDECREF(fast);
}

static int parse_batch_head(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want,
                            const char *name, uint64_t *cid, uint64_t *first) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments, got %zd", name, want, nargs);
        return -1;
    }
    if (get_u64(args[0], "cid", cid) || get_u64(args[1], "first_seq", first)) return -1;
    return 0;
}

static int check_plaintexts(Py_buffer *views, Py_ssize_t n, uint64_t first, Py_ssize_t *total) {
    Py_ssize_t t = 0;
    if (n > 0 && (uint64_t)(n - 1) > UINT64_MAX - first) {
        PyErr_SetString(PyExc_OverflowError, "sequence numbers would wrap past 2**64-1");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (views[i].len > MAX_PLAINTEXT) {
            PyErr_SetString(PyExc_ValueError, "plaintext too large");
            return -1;
        }
        if (t > PY_SSIZE_T_MAX - (views[i].len + HEADER_LEN + TAG_LEN)) {
            PyErr_SetString(PyExc_OverflowError, "batch too large");
            return -1;
        }
        t += views[i].len + HEADER_LEN + TAG_LEN;
    }
    *total = t;
    return 0;
}

static PyObject *RecordCipher_seal_batch(RecordCipher *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t cid, first;
    PyObject *fast = NULL, *result = NULL;
    Py_buffer *views = NULL;
    unsigned char **outs = NULL;
    Py_ssize_t n, i, total;
    int rc = 0;

    if (!ready(self)) return NULL;
    if (parse_batch_head(args, nargs, 3, "seal_batch", &cid, &first)) return NULL;
    n = get_buffers(args[2], &fast, &views, "plaintext");
    if (n < 0) return NULL;
    if (check_plaintexts(views, n, first, &total)) goto done;
    result = PyList_New(n);
    outs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(unsigned char *));
    if (!result || !outs) { if (!outs) PyErr_NoMemory(); Py_CLEAR(result); goto done; }
    for (i = 0; i < n; i++) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, HEADER_LEN + views[i].len + TAG_LEN);
        if (!b) { Py_CLEAR(result); goto done; }
        PyList_SET_ITEM(result, i, b);
        outs[i] = (unsigned char *)PyBytes_AS_STRING(b);
    }
    lock_ctx(self->enc_lock);
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n && rc == 0; i++)
        rc = seal_one(self->enc, self->iv, cid, first + (uint64_t)i, views[i].buf, views[i].len, outs[i]);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->enc_lock);
    if (rc) { Py_CLEAR(result); lib_error("seal_batch"); }
done:
    PyMem_Free(outs);
    release_buffers(fast, views, n);
    return result;
}

static PyObject *RecordCipher_seal_into(RecordCipher *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t cid, first;
    PyObject *fast = NULL, *result = NULL;
    Py_buffer *views = NULL, out = {0};
    Py_ssize_t n, i, total, pos = 0;
    int rc = 0;

    if (!ready(self)) return NULL;
    if (parse_batch_head(args, nargs, 4, "seal_into", &cid, &first)) return NULL;
    if (PyObject_GetBuffer(args[3], &out, PyBUF_WRITABLE) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "out must be a writable bytes-like object, not %.100s",
                     Py_TYPE(args[3])->tp_name);
        return NULL;
    }
    n = get_buffers(args[2], &fast, &views, "plaintext");
    if (n < 0) { PyBuffer_Release(&out); return NULL; }
    if (check_plaintexts(views, n, first, &total)) goto done;
    if (total > out.len) {
        PyErr_Format(PyExc_ValueError, "out holds %zd bytes, the records need %zd", out.len, total);
        goto done;
    }
    lock_ctx(self->enc_lock);
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n && rc == 0; i++) {
        rc = seal_one(self->enc, self->iv, cid, first + (uint64_t)i, views[i].buf, views[i].len,
                      (unsigned char *)out.buf + pos);
        pos += HEADER_LEN + views[i].len + TAG_LEN;
    }
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->enc_lock);
    if (rc) lib_error("seal_into");
    else result = PyLong_FromSsize_t(total);
done:
    release_buffers(fast, views, n);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *RecordCipher_open_batch(RecordCipher *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *fast = NULL, *result = NULL;
    Py_buffer *views = NULL;
    unsigned char **outs = NULL;
    signed char *status = NULL;   /* 0 ok, 1 auth failure/malformed, -1 library error */
    Py_ssize_t n, i;
    int liberr = 0;

    if (!ready(self)) return NULL;
    if (nargs != 1) {
        PyErr_Format(PyExc_TypeError, "open_batch() takes 1 argument (records), got %zd", nargs);
        return NULL;
    }
    n = get_buffers(args[0], &fast, &views, "record");
    if (n < 0) return NULL;
    result = PyList_New(n);
    outs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(unsigned char *));
    status = PyMem_Calloc(n ? (size_t)n : 1, 1);
    if (!result || !outs || !status) {
        if (result) PyErr_NoMemory();
        Py_CLEAR(result);
        goto done;
    }
    for (i = 0; i < n; i++) {
        const char *why;
        if (check_record(views[i].buf, views[i].len, &why)) {
            status[i] = 1;
            Py_INCREF(Py_None);
            PyList_SET_ITEM(result, i, Py_None);
            continue;
        }
        PyObject *b = PyBytes_FromStringAndSize(NULL, views[i].len - HEADER_LEN - TAG_LEN);
        if (!b) { Py_CLEAR(result); goto done; }
        PyList_SET_ITEM(result, i, b);
        outs[i] = (unsigned char *)PyBytes_AS_STRING(b);
    }
    lock_ctx(self->dec_lock);
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) {
        if (status[i]) continue;
        const unsigned char *r = views[i].buf;
        status[i] = (signed char)open_one(self->dec, self->iv, r, views[i].len, get_be64(r + 16), outs[i]);
    }
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->dec_lock);
    for (i = 0; i < n; i++) {
        if (status[i] < 0) liberr = 1;
        if (status[i] != 0 && outs[i]) {
            Py_INCREF(Py_None);
            PyList_SetItem(result, i, Py_None);   /* drops the unused bytes */
        }
    }
    if (liberr) { Py_CLEAR(result); lib_error("open_batch"); }
done:
    PyMem_Free(outs);
    PyMem_Free(status);
    release_buffers(fast, views, n);
    return result;
}

/* STREAM frame layout (docs/PROTOCOL.md §Frames; stcp/wire.py is the reference). */
#define FRAME_STREAM 0x03
#define STREAM_FLAG_FIN 0x01
#define STREAM_FRAME_OVERHEAD 12     /* type:u8 | flags:u8 | offset:u64 | length:u16 */
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
static PyObject *RecordCipher_seal_stream(RecordCipher *self, PyObject *const *args, Py_ssize_t nargs) {
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
            rc = seal_two(self->enc, self->iv, cid, first + (uint64_t)i, frame, STREAM_FRAME_OVERHEAD,
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

static PyObject *RecordCipher_open_records(RecordCipher *self, PyObject *const *args, Py_ssize_t nargs) {
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
        n += segs[nviews] ? (views[nviews].len + segs[nviews] - 1) / segs[nviews] : 1;
    }
    recs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(rx_record));
    if (!recs) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t e = 0, k = 0; e < m; e++) {
        Py_ssize_t seg = segs[e] ? segs[e] : (views[e].len ? views[e].len : 1);
        Py_ssize_t off = 0;
        do {
            recs[k].buf = (const unsigned char *)views[e].buf + off;
            recs[k].len = views[e].len - off < seg ? views[e].len - off : seg;
            recs[k].item = e;
            k++;
            off += seg;
        } while (off < views[e].len);
    }
    for (i = 0; i < n; i++) {
        const unsigned char *r = recs[i].buf;
        const char *why;
        rx_record *x = &recs[i];
        x->state = 1;
        if (x->len < HEADER_LEN) continue;
        uint64_t seq = get_be64(r + 16);
        if (get_be64(r + 8) != cid || seq == 0) continue;
        x->pn = seq & (((uint64_t)1 << 48) - 1);
        int is_new = x->pn > high;
        if (x->pn > high) high = x->pn;        /* later records at or below it take the general path */
        if (!is_new || (seq >> 48) != epoch || (uint64_t)x->len > max_len || check_record(r, x->len, &why))
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
            x->state = (signed char)open_one(self->dec, self->iv, x->buf, x->len, get_be64(x->buf + 16), plain + x->pos);
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

static PyObject *RecordCipher_get_suite(RecordCipher *self, void *closure) {
    return PyLong_FromLong(self->suite);
}

static PyMethodDef RecordCipher_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))RecordCipher_seal, METH_FASTCALL,
     "seal(cid, seq, plaintext) -> bytes: the whole record (header + ciphertext + tag)."},
    {"open", (PyCFunction)(void (*)(void))RecordCipher_open, METH_FASTCALL,
     "open(record, seq=None) -> bytes: plaintext. The nonce's seq is the header's unless given.\n"
     "Raises AuthError on tag failure, ValueError on a malformed record."},
    {"seal_batch", (PyCFunction)(void (*)(void))RecordCipher_seal_batch, METH_FASTCALL,
     "seal_batch(cid, first_seq, plaintexts) -> list[bytes]: records with seqs first_seq, first_seq+1, ..."},
    {"seal_into", (PyCFunction)(void (*)(void))RecordCipher_seal_into, METH_FASTCALL,
     "seal_into(cid, first_seq, plaintexts, out) -> int: records back to back into out; bytes written."},
    {"seal_stream", (PyCFunction)(void (*)(void))RecordCipher_seal_stream, METH_FASTCALL,
     "seal_stream(cid, first_seq, data, stream_offset, chunk, fin) -> bytes: data cut into records of\n"
     "one STREAM frame of `chunk` bytes each (the last may be shorter, and carries FIN if fin),\n"
     "sealed back to back with seqs first_seq, first_seq+1, ..."},
    {"open_records", (PyCFunction)(void (*)(void))RecordCipher_open_records, METH_FASTCALL,
     "open_records(datagrams, cid, epoch, largest_pn, limit[, max_len]) -> list: in datagram order (an entry may\n"
     "be a (buffer, segment_size) pair standing for the datagrams back to back in it),\n"
     "(offset, count, data, first_pn, record_bytes) for each stretch of new records of plain in-order\n"
     "stream data, (plaintext, pn, record_len) for other new authentic records, and the datagram itself\n"
     "for everything else (not new, other epoch or connection, longer than max_len, malformed, not authentic)."},
    {"open_batch", (PyCFunction)(void (*)(void))RecordCipher_open_batch, METH_FASTCALL,
     "open_batch(records) -> list[bytes | None]: None where a record is malformed or fails authentication."},
    {NULL}
};

static PyGetSetDef RecordCipher_getset[] = {
    {"suite", (getter)RecordCipher_get_suite, NULL, "cipher suite number", NULL},
    {NULL}
};

static PyTypeObject RecordCipherType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stcp._aead.RecordCipher",
    .tp_basicsize = sizeof(RecordCipher),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "RecordCipher(suite, key, iv): one direction's record protection for one key epoch.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RecordCipher_init,
    .tp_dealloc = (destructor)RecordCipher_dealloc,
    .tp_methods = RecordCipher_methods,
    .tp_getset = RecordCipher_getset,
};

static struct PyModuleDef aead_module = {
    PyModuleDef_HEAD_INIT, "stcp._aead",
    "STCP record protection in C over OpenSSL EVP (see stcp/crypto.py RecordKey).", -1, NULL,
};

PyMODINIT_FUNC PyInit__aead(void) {
    PyObject *m;
    if (PyType_Ready(&RecordCipherType) < 0) return NULL;
    if (scratch_init(&plaintexts) < 0) return PyErr_NoMemory();
    m = PyModule_Create(&aead_module);
    if (!m) return NULL;
    AuthError = PyErr_NewExceptionWithDoc("stcp._aead.AuthError",
                                          "A record failed authentication.", PyExc_ValueError, NULL);
    if (!AuthError || PyModule_AddObjectRef(m, "AuthError", AuthError) < 0 ||
        PyModule_AddObjectRef(m, "RecordCipher", (PyObject *)&RecordCipherType) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_LEN", HEADER_LEN) < 0 ||
        PyModule_AddIntConstant(m, "TAG_LEN", TAG_LEN) < 0 ||
        PyModule_AddIntConstant(m, "FRAME_STREAM", FRAME_STREAM) < 0 ||
        PyModule_AddIntConstant(m, "STREAM_FLAG_FIN", STREAM_FLAG_FIN) < 0 ||
        PyModule_AddIntConstant(m, "STREAM_FRAME_OVERHEAD", STREAM_FRAME_OVERHEAD) < 0 ||
        PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
