/*
 * One reusable scratch buffer per extension module, for the hot paths that need a large
 * temporary buffer on every call (recvmmsg's receive area, open_records' plaintexts).
 * A fresh multi-megabyte malloc per call costs page faults and unmaps on every batch; the
 * kept buffer faults once. Whoever finds it busy (another thread, with the GIL released)
 * gets a private allocation instead. Buffers above SCRATCH_KEEP are never kept.
 */
#ifndef STCP_SCRATCH_H
#define STCP_SCRATCH_H

#include <Python.h>
#include <pythread.h>

#define SCRATCH_KEEP ((size_t)8 << 20)

typedef struct {
    PyThread_type_lock lock;
    unsigned char *buf;
    size_t cap;
} scratch_t;

static int scratch_init(scratch_t *s) {
    s->lock = PyThread_allocate_lock();
    s->buf = NULL;
    s->cap = 0;
    return s->lock ? 0 : -1;
}

/* A buffer of at least n bytes; *shared tells scratch_put how to give it back. NULL if out of memory. */
static unsigned char *scratch_get(scratch_t *s, size_t n, int *shared) {
    if (n == 0) n = 1;
    if (n <= SCRATCH_KEEP && s->lock && PyThread_acquire_lock(s->lock, NOWAIT_LOCK)) {
        if (s->cap < n) {
            unsigned char *p = PyMem_RawRealloc(s->buf, n);
            if (!p) {
                PyThread_release_lock(s->lock);
                return NULL;
            }
            s->buf = p;
            s->cap = n;
        }
        *shared = 1;
        return s->buf;
    }
    *shared = 0;
    return PyMem_RawMalloc(n);
}

static void scratch_put(scratch_t *s, unsigned char *p, int shared) {
    if (shared) PyThread_release_lock(s->lock);
    else PyMem_RawFree(p);
}

#endif
