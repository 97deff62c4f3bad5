/*
 * stcp._udpio: batch UDP I/O for the socket datapath (sendmmsg/recvmmsg, which Python's
 * socket module lacks), with optional UDP GSO on send and GRO on receive.
 *
 * Both calls are non-blocking (MSG_DONTWAIT) whatever the socket's mode and release the
 * GIL around the system call.  Addresses are numeric and look like the socket module's:
 * (host, port) for AF_INET, (host, port, flowinfo, scope_id) for AF_INET6; an AF_INET6
 * socket also takes an IPv4 host, sent as ::ffff:a.b.c.d.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "scratch.h"
#include <errno.h>
#include <string.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <arpa/inet.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

#define MAX_BATCH 1024                   /* UIO_MAXIOV, the kernel's cap on vlen */
#define MAX_BUFSIZE (1 << 20)
#define MAX_RECV_MEMORY (64 << 20)

static int socket_family(int fd) {
    int family = 0;
    socklen_t len = sizeof(family);
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &family, &len) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (family != AF_INET && family != AF_INET6) {
        PyErr_Format(PyExc_ValueError, "socket family %d is neither AF_INET nor AF_INET6", family);
        return -1;
    }
    return family;
}

/* (host, port[, flowinfo[, scope_id]]) -> sockaddr for the socket's family. */
static int parse_addr(PyObject *addr, int family, struct sockaddr_storage *ss, socklen_t *len) {
    const char *host;
    int port;
    unsigned int flowinfo = 0, scope_id = 0;
    memset(ss, 0, sizeof(*ss));
    if (!PyTuple_Check(addr)) {
        PyErr_Format(PyExc_TypeError, "address must be a tuple, not %.100s", Py_TYPE(addr)->tp_name);
        return -1;
    }
    if (family == AF_INET) {
        if (!PyArg_ParseTuple(addr, "si;AF_INET address must be (host, port)", &host, &port))
            return -1;
    } else if (!PyArg_ParseTuple(addr, "si|II;AF_INET6 address must be (host, port[, flowinfo, scope_id])",
                                 &host, &port, &flowinfo, &scope_id)) {
        return -1;
    }
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "port must be 0-65535");
        return -1;
    }
    if (family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1) goto bad_host;
        *len = sizeof(*sin);
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
        struct in_addr v4;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        sin6->sin6_flowinfo = htonl(flowinfo);
        sin6->sin6_scope_id = scope_id;
        if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1) {
            if (inet_pton(AF_INET, host, &v4) != 1) goto bad_host;
            sin6->sin6_addr.s6_addr[10] = 0xff;
            sin6->sin6_addr.s6_addr[11] = 0xff;
            memcpy(&sin6->sin6_addr.s6_addr[12], &v4, 4);
        }
        *len = sizeof(*sin6);
    }
    return 0;
bad_host:
    PyErr_Format(PyExc_ValueError, "host %R is not a numeric address of the socket's family",
                 PyTuple_GET_ITEM(addr, 0));
    return -1;
}

static PyObject *make_addr(const struct sockaddr_storage *ss, socklen_t len) {
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &sin->sin_addr, host, sizeof(host));
        return Py_BuildValue("(si)", host, ntohs(sin->sin_port));
    }
    if (ss->ss_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof(host));
        return Py_BuildValue("(siII)", host, ntohs(sin6->sin6_port),
                             (unsigned int)ntohl(sin6->sin6_flowinfo), (unsigned int)sin6->sin6_scope_id);
    }
    Py_RETURN_NONE;   /* connected socket or unknown family: no address */
}

static int get_fd(PyObject *o) {
    int fd = PyObject_AsFileDescriptor(o);
    return fd;   /* -1 with an exception set on failure */
}

/* sendmmsg(fd, datagrams, addr=None, segment_size=0) -> int */
static PyObject *udpio_sendmmsg(PyObject *module, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fd", "datagrams", "addr", "segment_size", NULL};
    PyObject *fdobj, *datagrams, *addr = Py_None, *fast = NULL, *result = NULL;
    int segment_size = 0, fd, family;
    struct sockaddr_storage ss;
    socklen_t sslen = 0;
    Py_buffer *views = NULL;
    struct mmsghdr *msgs = NULL;
    struct iovec *iovs = NULL;
    char *cmsgbuf = NULL;
    Py_ssize_t n = 0, got = 0, i, sent = 0;
    const size_t cmsg_space = CMSG_SPACE(sizeof(uint16_t));

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|Oi:sendmmsg", kwlist, &fdobj, &datagrams,
                                     &addr, &segment_size))
        return NULL;
    if ((fd = get_fd(fdobj)) < 0) return NULL;
    if (segment_size < 0 || segment_size > 65535) {
        PyErr_SetString(PyExc_ValueError, "segment_size must be 0-65535");
        return NULL;
    }
    if (addr != Py_None) {
        if ((family = socket_family(fd)) < 0) return NULL;
        if (parse_addr(addr, family, &ss, &sslen)) return NULL;
    }
    fast = PySequence_Fast(datagrams, "datagrams must be a list or tuple of bytes-like objects");
    if (!fast) return NULL;
    n = PySequence_Fast_GET_SIZE(fast);
    views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    msgs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(struct mmsghdr));
    iovs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(struct iovec));
    if (segment_size) cmsgbuf = PyMem_Calloc(n ? (size_t)n : 1, cmsg_space);
    if (!views || !msgs || !iovs || (segment_size && !cmsgbuf)) { PyErr_NoMemory(); goto done; }
    for (got = 0; got < n; got++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, got);
        if (PyObject_GetBuffer(item, &views[got], PyBUF_SIMPLE) != 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "datagram %zd must be a bytes-like object, not %.100s",
                         got, Py_TYPE(item)->tp_name);
            goto done;
        }
        iovs[got].iov_base = views[got].buf;
        iovs[got].iov_len = (size_t)views[got].len;
        msgs[got].msg_hdr.msg_iov = &iovs[got];
        msgs[got].msg_hdr.msg_iovlen = 1;
        if (addr != Py_None) {
            msgs[got].msg_hdr.msg_name = &ss;
            msgs[got].msg_hdr.msg_namelen = sslen;
        }
        if (segment_size && views[got].len > segment_size) {
            struct cmsghdr *cm;
            char *cbuf = cmsgbuf + (size_t)got * cmsg_space;
            uint16_t gso = (uint16_t)segment_size;
            msgs[got].msg_hdr.msg_control = cbuf;
            msgs[got].msg_hdr.msg_controllen = cmsg_space;
            cm = CMSG_FIRSTHDR(&msgs[got].msg_hdr);
            cm->cmsg_level = SOL_UDP;
            cm->cmsg_type = UDP_SEGMENT;
            cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            memcpy(CMSG_DATA(cm), &gso, sizeof(gso));
        }
    }
    while (sent < n) {
        unsigned int vlen = (unsigned int)((n - sent) > MAX_BATCH ? MAX_BATCH : (n - sent));
        int r, err;
        Py_BEGIN_ALLOW_THREADS
        r = sendmmsg(fd, msgs + sent, vlen, MSG_DONTWAIT);
        err = errno;
        Py_END_ALLOW_THREADS
        if (r < 0) {
            if (err == EINTR) {
                if (PyErr_CheckSignals()) goto done;
                continue;
            }
            if (err == EAGAIN || err == EWOULDBLOCK || (err == ENOBUFS && sent > 0)) break;
            if (sent > 0) break;      /* report what went; the caller's retry meets the error */
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        sent += r;
        if ((unsigned int)r < vlen) break;
    }
    result = PyLong_FromSsize_t(sent);
done:
    for (i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(msgs);
    PyMem_Free(iovs);
    PyMem_Free(cmsgbuf);
    Py_XDECREF(fast);
    return result;
}

static scratch_t recv_area;      /* recvmmsg's receive buffers, kept between calls */

/* recvmmsg(fd, max_n, bufsize, gro=False) -> list[(bytes, addr)] or list[(bytes, addr, segment_size)] */
static PyObject *udpio_recvmmsg(PyObject *module, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fd", "max_n", "bufsize", "gro", NULL};
    PyObject *fdobj, *result = NULL, *last_addr = NULL;
    Py_ssize_t max_n, bufsize;
    int gro = 0, fd, r = -1, err = 0, i, shared = 0;
    char *data = NULL, *cmsgbuf = NULL;
    struct mmsghdr *msgs = NULL;
    struct iovec *iovs = NULL;
    struct sockaddr_storage *addrs = NULL;
    const size_t cmsg_space = CMSG_SPACE(sizeof(int));

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Onn|p:recvmmsg", kwlist, &fdobj, &max_n, &bufsize, &gro))
        return NULL;
    if ((fd = get_fd(fdobj)) < 0) return NULL;
    if (max_n < 1 || max_n > MAX_BATCH) {
        PyErr_Format(PyExc_ValueError, "max_n must be 1-%d", MAX_BATCH);
        return NULL;
    }
    if (bufsize < 1 || bufsize > MAX_BUFSIZE || max_n * bufsize > MAX_RECV_MEMORY) {
        PyErr_Format(PyExc_ValueError, "bufsize must be 1-%d and max_n * bufsize at most %d",
                     MAX_BUFSIZE, MAX_RECV_MEMORY);
        return NULL;
    }
    data = (char *)scratch_get(&recv_area, (size_t)(max_n * bufsize), &shared);
    msgs = PyMem_Calloc((size_t)max_n, sizeof(struct mmsghdr));
    iovs = PyMem_Calloc((size_t)max_n, sizeof(struct iovec));
    addrs = PyMem_Calloc((size_t)max_n, sizeof(struct sockaddr_storage));
    if (gro) cmsgbuf = PyMem_Calloc((size_t)max_n, cmsg_space);
    if (!data || !msgs || !iovs || !addrs || (gro && !cmsgbuf)) { PyErr_NoMemory(); goto done; }
    for (i = 0; i < max_n; i++) {
        iovs[i].iov_base = data + (size_t)i * (size_t)bufsize;
        iovs[i].iov_len = (size_t)bufsize;
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &addrs[i];
        msgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_storage);
        if (gro) {
            msgs[i].msg_hdr.msg_control = cmsgbuf + (size_t)i * cmsg_space;
            msgs[i].msg_hdr.msg_controllen = cmsg_space;
        }
    }
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        r = recvmmsg(fd, msgs, (unsigned int)max_n, MSG_DONTWAIT, NULL);
        err = errno;
        Py_END_ALLOW_THREADS
        if (r >= 0 || err != EINTR) break;
        if (PyErr_CheckSignals()) goto done;
    }
    if (r < 0) {
        if (err == EAGAIN || err == EWOULDBLOCK) {
            result = PyList_New(0);
        } else {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
        }
        goto done;
    }
    result = PyList_New(r);
    if (!result) goto done;
    for (i = 0; i < r; i++) {
        struct msghdr *h = &msgs[i].msg_hdr;
        Py_ssize_t len = (Py_ssize_t)msgs[i].msg_len;
        PyObject *payload, *addr, *item;
        if (len > bufsize) len = bufsize;      /* truncated (MSG_TRUNC): keep what fits */
        /* consecutive datagrams from one peer share one address object */
        if (i > 0 && last_addr && h->msg_namelen == msgs[i - 1].msg_hdr.msg_namelen &&
            memcmp(&addrs[i], &addrs[i - 1], h->msg_namelen) == 0) {
            addr = Py_NewRef(last_addr);
        } else {
            addr = make_addr(&addrs[i], h->msg_namelen);
            if (!addr) { Py_CLEAR(result); goto done; }
            Py_XSETREF(last_addr, Py_NewRef(addr));
        }
        payload = PyBytes_FromStringAndSize(iovs[i].iov_base, len);
        if (!payload) { Py_DECREF(addr); Py_CLEAR(result); goto done; }
        if (gro) {
            int seg = (int)len;
            struct cmsghdr *cm;
            for (cm = CMSG_FIRSTHDR(h); cm; cm = CMSG_NXTHDR(h, cm)) {
                if (cm->cmsg_level == SOL_UDP && cm->cmsg_type == UDP_GRO &&
                    cm->cmsg_len >= CMSG_LEN(sizeof(int))) {
                    memcpy(&seg, CMSG_DATA(cm), sizeof(int));
                    break;
                }
            }
            item = Py_BuildValue("(NNi)", payload, addr, seg);
        } else {
            item = PyTuple_Pack(2, payload, addr);
            Py_DECREF(payload);
            Py_DECREF(addr);
        }
        if (!item) { Py_CLEAR(result); goto done; }
        PyList_SET_ITEM(result, i, item);
    }
done:
    Py_XDECREF(last_addr);
    if (data) scratch_put(&recv_area, (unsigned char *)data, shared);
    PyMem_Free(msgs);
    PyMem_Free(iovs);
    PyMem_Free(addrs);
    PyMem_Free(cmsgbuf);
    return result;
}

static PyMethodDef udpio_methods[] = {
    {"sendmmsg", (PyCFunction)(void (*)(void))udpio_sendmmsg, METH_VARARGS | METH_KEYWORDS,
     "sendmmsg(fd, datagrams, addr=None, segment_size=0) -> int\n\n"
     "Send each datagram (to addr, or to the connected peer if None) in as few system calls as\n"
     "possible; returns how many went (fewer if the socket buffer filled: EAGAIN is not an\n"
     "error). With segment_size, a datagram longer than it is one UDP GSO buffer the kernel\n"
     "splits into segment_size pieces. Raises OSError if the first datagram fails."},
    {"recvmmsg", (PyCFunction)(void (*)(void))udpio_recvmmsg, METH_VARARGS | METH_KEYWORDS,
     "recvmmsg(fd, max_n, bufsize, gro=False) -> list[(bytes, addr)]\n\n"
     "Receive up to max_n datagrams waiting on the socket, without blocking ([] if none).\n"
     "With gro=True (socket has UDP_GRO set) items are (bytes, addr, segment_size)."},
    {NULL}
};

static struct PyModuleDef udpio_module = {
    PyModuleDef_HEAD_INIT, "stcp._udpio", "Batch UDP I/O: sendmmsg/recvmmsg, UDP GSO and GRO.", -1,
    udpio_methods,
};

PyMODINIT_FUNC PyInit__udpio(void) {
    PyObject *m;
    if (scratch_init(&recv_area) < 0) return PyErr_NoMemory();
    m = PyModule_Create(&udpio_module);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "MAX_BATCH", MAX_BATCH) < 0 ||
        PyModule_AddIntConstant(m, "UDP_SEGMENT", UDP_SEGMENT) < 0 ||
        PyModule_AddIntConstant(m, "UDP_GRO", UDP_GRO) < 0 ||
        PyModule_AddIntConstant(m, "SOL_UDP", SOL_UDP) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
