/*
 * stcp._aead: STCP record protection in C (docs/PROTOCOL.md §6 Record protection).
 *
 * Record = header (length:u64 | cid:u64 | seq:u64, big-endian, 24 bytes)
 *        || AEAD(key, nonce = iv XOR (0^32 || seq_be64), aad = header, plaintext) || tag(16)
 * with length = len(ciphertext) + 16.  stcp/crypto.py RecordKey is the reference.
 *
 * The cipher is OpenSSL's EVP (AES-256-GCM or ChaCha20-Poly1305); no cryptography is
 * done here beyond calling it.  Each RecordCipher keeps one EVP_CIPHER_CTX for sealing
 * and one for opening, initialised once with the key; per record only the IV is set
 * (EVP_EncryptInit_ex with no cipher and no key) and the tag read or set.
 * A context is used by one thread at a time (a lock per context), so one RecordCipher may
 * be shared between threads.
 *
 * This file is the type, one record at a time (seal, open) and the module; the bulk calls
 * take every buffer first, then release the GIL for all the crypto: seal_stream in
 * aead_send.c, open_records in aead_receive.c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <string.h>
#include <stdint.h>
#include <openssl/evp.h>
#include <openssl/crypto.h>
#include <openssl/opensslv.h>
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
#include <openssl/core_names.h>
#include <openssl/params.h>
#endif

#include "aead.h"

#define KEY_LEN 32
#define SUITE_AES_256_GCM 1
#define SUITE_CHACHA20_POLY1305 2
/* Single records at least this long release the GIL (small ones cost less than the switch). */
#define GIL_RELEASE_MIN 16384

static PyObject *AuthError;

/* ---- one record, no Python calls (safe without the GIL) ------------------------- */

static inline void make_nonce(const unsigned char *iv, uint64_t seq, unsigned char *nonce) {
    unsigned char s[8];
    put_be64(s, seq);
    memcpy(nonce, iv, 4);
    for (int i = 0; i < 8; i++) nonce[4 + i] = iv[4 + i] ^ s[i];
}

/* Read the tag of the record just sealed (set 0) or set the tag of the record about to be
 * opened (set 1). Through the provider's parameters on OpenSSL 3: EVP_CIPHER_CTX_ctrl
 * builds this same OSSL_PARAM on every call after a dispatch of its own. */
static inline int aead_tag(EVP_CIPHER_CTX *ctx, unsigned char *tag, int set) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    OSSL_PARAM params[2] = {OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag, TAG_LEN),
                            OSSL_PARAM_construct_end()};
    return set ? EVP_CIPHER_CTX_set_params(ctx, params) : EVP_CIPHER_CTX_get_params(ctx, params);
#else
    return EVP_CIPHER_CTX_ctrl(ctx, set ? EVP_CTRL_AEAD_SET_TAG : EVP_CTRL_AEAD_GET_TAG, TAG_LEN, tag);
#endif
}

int seal_record(EVP_CIPHER_CTX *ctx, const unsigned char *iv, uint64_t cid, uint64_t seq,
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
    if (aead_tag(ctx, out + HEADER_LEN + ptlen, 0) != 1) return -1;
    return 0;
}

int open_record(EVP_CIPHER_CTX *ctx, const unsigned char *iv, const unsigned char *rec, Py_ssize_t len,
                uint64_t seq, unsigned char *out) {
    unsigned char nonce[IV_LEN], tag[TAG_LEN];
    Py_ssize_t ctlen = len - HEADER_LEN - TAG_LEN;
    int outl = 0, finl = 0;
    make_nonce(iv, seq, nonce);
    memcpy(tag, rec + HEADER_LEN + ctlen, TAG_LEN);
    if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1) return -1;
    if (EVP_DecryptUpdate(ctx, NULL, &outl, rec, HEADER_LEN) != 1) return -1;
    outl = 0;
    if (ctlen > 0 && EVP_DecryptUpdate(ctx, out, &outl, rec + HEADER_LEN, (int)ctlen) != 1) return -1;
    if (aead_tag(ctx, tag, 1) != 1) return -1;
    if (EVP_DecryptFinal_ex(ctx, out + outl, &finl) != 1) {
        OPENSSL_cleanse(out, (size_t)ctlen);
        return 1;
    }
    return 0;
}

/* ---- type ---------------------------------------------------------------------- */

/* Free what RecordCipher_init allocated: afterwards the object reads as never initialised,
 * so an __init__ that failed half way and is called again starts from nothing. */
static void release(RecordCipher *self) {
    if (self->enc) { EVP_CIPHER_CTX_free(self->enc); self->enc = NULL; }
    if (self->dec) { EVP_CIPHER_CTX_free(self->dec); self->dec = NULL; }
    if (self->enc_lock) { PyThread_free_lock(self->enc_lock); self->enc_lock = NULL; }
    if (self->dec_lock) { PyThread_free_lock(self->dec_lock); self->dec_lock = NULL; }
    OPENSSL_cleanse(self->iv, IV_LEN);
}

static void RecordCipher_dealloc(RecordCipher *self) {
    release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int RecordCipher_init(RecordCipher *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"suite", "key", "iv", NULL};
    int suite;
    Py_buffer key = {0}, iv = {0};
    const EVP_CIPHER *cipher;
    int rc = -1;

    if (self->enc) {      /* re-keying would race a thread inside a bulk call: one key per object */
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
    if (rc != 0) release(self);
    if (key.obj) PyBuffer_Release(&key);
    if (iv.obj) PyBuffer_Release(&iv);
    return rc;
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
        rc = seal_record(self->enc, self->iv, cid, seq, pt.buf, pt.len, NULL, 0,
                         (unsigned char *)PyBytes_AS_STRING(out));
        Py_END_ALLOW_THREADS
    } else {
        rc = seal_record(self->enc, self->iv, cid, seq, pt.buf, pt.len, NULL, 0,
                         (unsigned char *)PyBytes_AS_STRING(out));
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
        rc = open_record(self->dec, self->iv, rec.buf, rec.len, seq, (unsigned char *)PyBytes_AS_STRING(out));
        Py_END_ALLOW_THREADS
    } else {
        rc = open_record(self->dec, self->iv, rec.buf, rec.len, seq, (unsigned char *)PyBytes_AS_STRING(out));
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

static PyObject *RecordCipher_get_suite(RecordCipher *self, void *closure) {
    return PyLong_FromLong(self->suite);
}

static PyMethodDef RecordCipher_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))RecordCipher_seal, METH_FASTCALL,
     "seal(cid, seq, plaintext) -> bytes: the whole record (header + ciphertext + tag)."},
    {"open", (PyCFunction)(void (*)(void))RecordCipher_open, METH_FASTCALL,
     "open(record, seq=None) -> bytes: plaintext. The nonce's seq is the header's unless given.\n"
     "Raises AuthError on tag failure, ValueError on a malformed record."},
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
    if (aead_receive_init() < 0) return PyErr_NoMemory();
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
