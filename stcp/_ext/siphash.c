/*
 * stcp._siphash: SipHash-2-4 with a 128-bit output, the keyed function of the handshake
 * cookie (docs/PROTOCOL.md section 4.5). stcp/siphash.py holds the pure-Python reference
 * and tests/test_cookie.py checks both against the reference implementation's vectors.
 *
 * A server under a hello flood computes one of these per hello before any X25519, so it
 * must cost far less than the X25519 it saves: in Python it would not (tens of
 * microseconds), in C it is a few dozen nanoseconds plus the call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))

#define SIPROUND                                                                   \
    do {                                                                           \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                  \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                     \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                     \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                  \
    } while (0)

static uint64_t load_le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void store_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

static void siphash128(const uint8_t *in, size_t inlen, const uint8_t key[16], uint8_t out[16]) {
    uint64_t k0 = load_le64(key), k1 = load_le64(key + 8);
    uint64_t v0 = UINT64_C(0x736f6d6570736575) ^ k0;
    uint64_t v1 = UINT64_C(0x646f72616e646f6d) ^ k1 ^ 0xee;   /* 128-bit output */
    uint64_t v2 = UINT64_C(0x6c7967656e657261) ^ k0;
    uint64_t v3 = UINT64_C(0x7465646279746573) ^ k1;
    size_t full = inlen - inlen % 8;
    for (size_t i = 0; i < full; i += 8) {
        uint64_t m = load_le64(in + i);
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
    }
    uint64_t b = (uint64_t)inlen << 56;
    for (size_t i = 0; i < inlen % 8; i++)
        b |= (uint64_t)in[full + i] << (8 * i);
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xee;
    SIPROUND; SIPROUND; SIPROUND; SIPROUND;
    store_le64(out, v0 ^ v1 ^ v2 ^ v3);
    v1 ^= 0xdd;
    SIPROUND; SIPROUND; SIPROUND; SIPROUND;
    store_le64(out + 8, v0 ^ v1 ^ v2 ^ v3);
}

static PyObject *py_siphash128(PyObject *self, PyObject *args) {
    Py_buffer key, data;
    if (!PyArg_ParseTuple(args, "y*y*:siphash128", &key, &data))
        return NULL;
    PyObject *result = NULL;
    if (key.len != 16) {
        PyErr_SetString(PyExc_ValueError, "SipHash takes a 16-byte key");
    } else {
        uint8_t out[16];
        siphash128(data.buf, (size_t)data.len, key.buf, out);
        result = PyBytes_FromStringAndSize((const char *)out, 16);
    }
    PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef methods[] = {
    {"siphash128", py_siphash128, METH_VARARGS,
     "siphash128(key, data) -> bytes: SipHash-2-4 with the 128-bit output, 16-byte key."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "stcp._siphash", "SipHash-2-4-128 for the handshake cookie.", -1, methods,
};

PyMODINIT_FUNC PyInit__siphash(void) {
    return PyModule_Create(&module);
}
