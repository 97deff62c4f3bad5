/*
 * stcp._xsk: the AF_XDP sockets of the afxdp datapath (libxdp's xsk API): receive, and
 * transmit of replies when the datapath is asked to (`--afxdp-tx afxdp`).
 *
 * One XskSocket owns one UMEM (an anonymous mapping cut into fixed-size frames) and one
 * AF_XDP socket bound to (interface, RX queue) with its four rings: fill and completion
 * (the UMEM's), RX and TX.  The socket is created with XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD:
 * the XDP program is bcc's (bpf/stcp_xdp.c compiled with -DSTCP_AFXDP), and the caller puts
 * fd() into that program's XSKMAP under the queue id.  Binding asks for nothing in
 * particular, so the kernel uses zero-copy when the driver offers it and copy mode
 * otherwise (veth); `zerocopy` says which one it got.
 *
 * recv() takes up to max_n frames off the RX ring, parses each (xsk_frame.c: Ethernet,
 * one optional VLAN tag, IPv4 or IPv6, UDP, every read bounds-checked), copies the UDP
 * payloads out, one flow's consecutive datagrams joined into one entry as UDP GRO joins
 * them (xsk_gro.c), and gives the frames straight back to the fill ring; with
 * templates=True it also returns the headers of a reply to each sender (xsk_frame.c).
 * Bound with XDP_USE_SG, a packet longer than a frame (a GSO buffer that generic XDP
 * passed whole) arrives in pieces: its headers are parsed in the first and its payload
 * copied from the pieces straight into the bytes object recv() returns (take_pieces); a
 * packet whose pieces a recv() sees only in part is left on the ring for the next call,
 * or, when it is the first thing on the ring, gathered into one buffer before parsing.  The UDP checksum is not checked: on
 * veth it is often still partial (checksum offload), and the records carry an AEAD tag.
 *
 * send_udp() puts datagrams behind such a template on the TX ring, lengths and checksums
 * computed per datagram, and kicks the kernel; copy mode transmits 32 frames per kick, so
 * it kicks until the ring is consumed.  The datapath replies this way with
 * `--afxdp-tx afxdp`; by default its replies leave through a kernel UDP socket, which
 * consults the neighbour and routing tables and the host firewall (docs/OPERATIONS.md,
 * "The AF_XDP datapath", says why that stays the default).  send() puts whole frames built
 * by the caller on the ring.
 *
 * The GIL is released around the system calls (fill-ring wakeup, TX kick, poll).  A socket is used
 * from one thread at a time; close() while another thread is inside poll() raises.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <net/if.h>
#include <linux/if_xdp.h>

#include <xdp/xsk.h>

#include "xsk_frame.h"
#include "xsk_gro.h"

#ifndef SOL_XDP
#define SOL_XDP 283
#endif
/* multi-buffer AF_XDP (kernel 6.6): a packet longer than a frame arrives in several, all
 * but the last flagged XDP_PKT_CONTD (older UAPI headers lack both) */
#ifndef XDP_USE_SG
#define XDP_USE_SG (1 << 4)
#endif
#ifndef XDP_PKT_CONTD
#define XDP_PKT_CONTD (1 << 0)
#endif

#define MAX_RECV_BATCH 1024
/* The longest packet taken in pieces: a 64 KB GSO buffer with its headers; one that runs
 * longer is dropped as malformed (the kernel makes at most MAX_SKB_FRAGS + 1 pieces). */
#define CHAIN_MAX (65536 + 256)

typedef struct {
    PyObject_HEAD
    struct xsk_umem *umem;
    struct xsk_socket *xsk;
    struct xsk_ring_prod fq, tx;
    struct xsk_ring_cons cq, rx;
    void *area;
    size_t area_size;
    uint32_t frame_size, frame_count;
    uint32_t ifindex, queue_id;
    int fd;
    int zerocopy;
    int busy;                        /* a thread is inside a GIL-free section */
    int sg;                          /* bound with XDP_USE_SG: packets may come in pieces */
    uint8_t *chain;                  /* a packet in pieces, gathered (CHAIN_MAX bytes) */
    uint32_t chain_len;
    int chain_bad;                   /* it ran past CHAIN_MAX: dropped when it ends */
    uint64_t *free_frames;           /* frames not on the fill ring */
    uint32_t n_free;
    unsigned long long rx_frames, rx_bytes, rx_malformed, rx_chained, rx_gathered, wakeups, tx_frames, tx_kicks;
    char ifname[IF_NAMESIZE];
} XskSocket;

static int xsk_closed(XskSocket *self) {
    if (!self->xsk) {
        PyErr_SetString(PyExc_ValueError, "AF_XDP socket is closed");
        return 1;
    }
    return 0;
}

/* Move free frames onto the fill ring; returns how many went. */
static uint32_t refill(XskSocket *self) {
    uint32_t idx = 0, n, i;
    if (!self->n_free) return 0;
    n = xsk_prod_nb_free(&self->fq, self->n_free);
    if (n > self->n_free) n = self->n_free;
    if (!n) return 0;
    n = xsk_ring_prod__reserve(&self->fq, n, &idx);
    for (i = 0; i < n; i++)
        *xsk_ring_prod__fill_addr(&self->fq, idx + i) = self->free_frames[--self->n_free];
    xsk_ring_prod__submit(&self->fq, n);
    return n;
}

static void release_all(XskSocket *self) {
    if (self->xsk) { xsk_socket__delete(self->xsk); self->xsk = NULL; }
    if (self->umem) { xsk_umem__delete(self->umem); self->umem = NULL; }
    if (self->area) { munmap(self->area, self->area_size); self->area = NULL; }
    PyMem_Free(self->free_frames);
    self->free_frames = NULL;
    PyMem_Free(self->chain);
    self->chain = NULL;
    self->chain_len = 0;
    self->n_free = 0;
    self->fd = -1;
}

static void Xsk_dealloc(XskSocket *self) {
    release_all(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int pow2(uint32_t v) { return v && !(v & (v - 1)); }

static int Xsk_init(XskSocket *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"ifname", "queue_id", "frame_count", "frame_size", "ring_size", "zerocopy", "sg", NULL};
    const char *ifname;
    unsigned int queue_id, frame_count = 4096, frame_size = XSK_UMEM__DEFAULT_FRAME_SIZE, ring_size = 2048;
    int zc = -1;                      /* -1: whatever the driver offers, 0: copy, 1: zero-copy or fail */
    int sg = 1;                       /* ask for packets in pieces; without, where refused */
    PyObject *zcobj = Py_None;
    struct xsk_umem_config ucfg;
    struct xsk_socket_config scfg;
    struct xdp_options opts;
    socklen_t optlen = sizeof(opts);
    int err;
    uint32_t i;

    if (self->xsk) { PyErr_SetString(PyExc_RuntimeError, "XskSocket already initialised"); return -1; }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sI|IIIOp:XskSocket", kwlist, &ifname, &queue_id, &frame_count,
                                     &frame_size, &ring_size, &zcobj, &sg))
        return -1;
    if (zcobj != Py_None) {
        zc = PyObject_IsTrue(zcobj);
        if (zc < 0) return -1;
    }
    if (strlen(ifname) == 0 || strlen(ifname) >= IF_NAMESIZE) {
        PyErr_Format(PyExc_ValueError, "bad interface name %R", PyTuple_GET_ITEM(args, 0));
        return -1;
    }
    if (frame_size != 2048 && frame_size != 4096) {
        PyErr_SetString(PyExc_ValueError, "frame_size must be 2048 or 4096");
        return -1;
    }
    if (!pow2(ring_size) || ring_size < 64 || ring_size > 16384) {
        PyErr_SetString(PyExc_ValueError, "ring_size must be a power of two in 64..16384");
        return -1;
    }
    if (frame_count < ring_size || frame_count > (1u << 18)) {
        PyErr_SetString(PyExc_ValueError, "frame_count must be in ring_size..262144");
        return -1;
    }
    self->ifindex = if_nametoindex(ifname);
    if (!self->ifindex) {
        PyErr_Format(PyExc_OSError, "interface '%s' not found in this network namespace", ifname);
        return -1;
    }
    snprintf(self->ifname, sizeof(self->ifname), "%s", ifname);
    self->queue_id = queue_id;
    self->frame_size = frame_size;
    self->frame_count = frame_count;
    self->area_size = (size_t)frame_size * frame_count;
    self->fd = -1;
    self->area = mmap(NULL, self->area_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (self->area == MAP_FAILED) {
        self->area = NULL;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->free_frames = PyMem_Malloc(sizeof(uint64_t) * frame_count);
    if (!self->free_frames) { release_all(self); PyErr_NoMemory(); return -1; }
    for (i = 0; i < frame_count; i++)
        self->free_frames[i] = (uint64_t)(frame_count - 1 - i) * frame_size;
    self->n_free = frame_count;

    memset(&ucfg, 0, sizeof(ucfg));
    ucfg.fill_size = ring_size;
    ucfg.comp_size = ring_size;
    ucfg.frame_size = frame_size;
    ucfg.frame_headroom = 0;
    memset(&scfg, 0, sizeof(scfg));
    scfg.rx_size = ring_size;
    scfg.tx_size = ring_size;
    scfg.libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD;
    /* Generic XDP hands a GSO buffer from a same-host sender over whole (a batch of
     * records, bpf/stcp_xdp.c batch_ok): with XDP_USE_SG it arrives in pieces instead of
     * being dropped for not fitting a frame. A kernel or zero-copy driver without
     * multi-buffer support refuses the flag: then UMEM and socket are made again without. */
    for (;;) {
        err = xsk_umem__create(&self->umem, self->area, self->area_size, &self->fq, &self->cq, &ucfg);
        if (err) {
            self->umem = NULL;
            release_all(self);
            errno = -err;
            PyErr_Format(PyExc_OSError, "AF_XDP UMEM: %s", strerror(-err));
            return -1;
        }
        scfg.bind_flags = XDP_USE_NEED_WAKEUP | (zc == 0 ? XDP_COPY : zc == 1 ? XDP_ZEROCOPY : 0) |
                          (sg ? XDP_USE_SG : 0);
        Py_BEGIN_ALLOW_THREADS
        err = xsk_socket__create(&self->xsk, ifname, queue_id, self->umem, &self->rx, &self->tx, &scfg);
        Py_END_ALLOW_THREADS
        if (!err)
            break;
        self->xsk = NULL;
        xsk_umem__delete(self->umem);
        self->umem = NULL;
        if (!sg || (err != -EINVAL && err != -EOPNOTSUPP)) {
            release_all(self);
            PyErr_Format(PyExc_OSError, "AF_XDP socket on %s queue %u: %s", ifname, queue_id, strerror(-err));
            return -1;
        }
        sg = 0;
    }
    self->sg = sg;
    if (sg && !(self->chain = PyMem_Malloc(CHAIN_MAX))) { release_all(self); PyErr_NoMemory(); return -1; }
    self->fd = xsk_socket__fd(self->xsk);
    memset(&opts, 0, sizeof(opts));
    if (getsockopt(self->fd, SOL_XDP, XDP_OPTIONS, &opts, &optlen) == 0)
        self->zerocopy = (opts.flags & XDP_OPTIONS_ZEROCOPY) != 0;
    refill(self);
    return 0;
}

static PyObject *Xsk_fileno(XskSocket *self, PyObject *noargs) {
    if (xsk_closed(self)) return NULL;
    return PyLong_FromLong(self->fd);
}

/* Kick the kernel when the fill ring asks for it (zero-copy drivers; copy mode too when
 * the ring ran dry). */
static void wakeup_fill(XskSocket *self) {
    if (xsk_ring_prod__needs_wakeup(&self->fq)) {
        self->wakeups++;
        self->busy++;
        Py_BEGIN_ALLOW_THREADS
        recvfrom(self->fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
        Py_END_ALLOW_THREADS
        self->busy--;
    }
}

/* Gather one piece of a packet that arrives in several frames; returns the whole packet
 * (in self->chain) once its last piece is in, else NULL. A packet longer than CHAIN_MAX
 * is dropped as malformed when it ends. */
static const uint8_t *gather(XskSocket *self, const uint8_t *piece, uint32_t len, int more, uint32_t *total) {
    if (self->chain_bad || len > CHAIN_MAX - self->chain_len) {
        self->chain_bad = 1;
    } else {
        memcpy(self->chain + self->chain_len, piece, len);
        self->chain_len += len;
    }
    if (more) return NULL;
    *total = self->chain_len;
    self->chain_len = 0;
    if (self->chain_bad) {
        self->chain_bad = 0;
        self->rx_malformed++;
        return NULL;
    }
    self->rx_chained++;
    self->rx_gathered++;
    return self->chain;
}

/* A packet in pieces whose pieces are all among descriptors [i, n) of this peek: its UDP
 * payload copied from the pieces straight into one bytes object, the headers parsed in the
 * first piece (gather() copies the packet once more before that).  Returns the
 * descriptors taken, their frames given back; PIECES_LATER when its last piece is not among
 * them (the caller leaves it on the ring for its next call); 0 to leave the packet to
 * gather() (a piece lies outside the UMEM, it runs past CHAIN_MAX, its headers are not all
 * in the first piece). *alloc_failed is set when allocating failed (exception set). */
#define PIECES_LATER (-2)
static int take_pieces(XskSocket *self, uint32_t idx, uint32_t i, uint32_t n, rx_batch *b, int failed,
                       int *alloc_failed) {
    const uint8_t *piece[RX_PIECES_MAX];
    uint32_t len[RX_PIECES_MAX], count = 0, k;
    uint64_t total = 0;
    struct parsed p;

    for (k = i; k < n; k++) {
        const struct xdp_desc *d = xsk_ring_cons__rx_desc(&self->rx, idx + k);
        uint64_t addr = xsk_umem__add_offset_to_addr(d->addr);
        if (addr >= self->area_size || d->len > self->area_size - addr || count == RX_PIECES_MAX) return 0;
        piece[count] = (const uint8_t *)self->area + addr;
        len[count++] = d->len;
        total += d->len;
        if (!(d->options & XDP_PKT_CONTD)) break;
    }
    if (k == n) return PIECES_LATER;
    memset(&p, 0, sizeof(p));
    if (total > CHAIN_MAX || parse_frame_head(piece[0], len[0], (size_t)total, &p))
        return 0;                                 /* gather() decides, as for any packet */
    for (k = i; k < i + count; k++) {             /* the frames go back, as in recv() */
        uint64_t base = xsk_umem__extract_addr(xsk_ring_cons__rx_desc(&self->rx, idx + k)->addr);
        if (self->n_free < self->frame_count)
            self->free_frames[self->n_free++] = base - (base % self->frame_size);
    }
    self->rx_frames++;
    self->rx_bytes += p.payload_len;
    self->rx_chained++;
    if (!failed && rx_batch_add_pieces(b, &p, piece, len, count, (uint32_t)(p.payload - piece[0])) < 0)
        *alloc_failed = 1;                        /* the frames are back all the same */
    return (int)count;
}

static PyObject *Xsk_recv(XskSocket *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"max_n", "v4mapped", "templates", "gro", NULL};
    int max_n = 64, v4mapped = 0, templates = 0, gro = 1, failed = 0;
    uint32_t idx = 0, n, i;
    rx_batch b;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "|ippp:recv", kwlist, &max_n, &v4mapped, &templates, &gro))
        return NULL;
    if (xsk_closed(self)) return NULL;
    if (max_n < 1 || max_n > MAX_RECV_BATCH) {
        PyErr_Format(PyExc_ValueError, "max_n must be in 1..%d", MAX_RECV_BATCH);
        return NULL;
    }
    rx_batch_init(&b, v4mapped, self->ifindex, templates, gro);
    n = xsk_ring_cons__peek(&self->rx, (uint32_t)max_n, &idx);
    for (i = 0; i < n; i++) {
        const struct xdp_desc *d = xsk_ring_cons__rx_desc(&self->rx, idx + i);
        uint64_t base = xsk_umem__extract_addr(d->addr);
        uint64_t addr = xsk_umem__add_offset_to_addr(d->addr);
        const uint8_t *frame;
        uint32_t len = d->len;
        int chained = self->chain_len > 0 || self->chain_bad || (d->options & XDP_PKT_CONTD);
        struct parsed p;

        /* the first piece of a packet in pieces: copied once if all of it is here */
        if (chained && self->chain && !self->chain_len && !self->chain_bad) {
            int alloc_failed = 0, took = take_pieces(self, idx, i, n, &b, failed, &alloc_failed);
            if (took == PIECES_LATER && i > 0) {
                /* the next call peeks again from its first piece */
                xsk_ring_cons__cancel(&self->rx, n - i);
                n = i;
                break;
            }
            if (alloc_failed) {               /* the rest is drained, as after any failed allocation */
                rx_batch_abort(&b);
                failed = 1;
            }
            if (took > 0) {
                i += (uint32_t)took - 1;
                continue;
            }
        }

        /* give the frame back whatever happens to it below: the fill ring gets it once
         * this call is done with what it holds */
        if (self->n_free < self->frame_count)
            self->free_frames[self->n_free++] = base - (base % self->frame_size);
        if (addr >= self->area_size || d->len > self->area_size - addr) {
            if (chained && self->chain) {     /* spoils the packet it is a piece of */
                self->chain_bad = 1;
                gather(self, NULL, 0, (d->options & XDP_PKT_CONTD) != 0, &len);
            } else {
                self->rx_malformed++;
            }
            continue;
        }
        frame = (const uint8_t *)self->area + addr;
        if (chained) {
            if (!self->chain) {               /* pieces without XDP_USE_SG: cannot happen */
                self->rx_malformed++;
                continue;
            }
            frame = gather(self, frame, len, (d->options & XDP_PKT_CONTD) != 0, &len);
            if (!frame) continue;
        }
        memset(&p, 0, sizeof(p));
        if (parse_frame_raw(frame, len, &p)) {
            self->rx_malformed++;
            continue;
        }
        self->rx_frames++;
        self->rx_bytes += p.payload_len;
        if (failed) continue;                 /* an earlier allocation failed: just drain */
        if (rx_batch_add(&b, &p, !chained) < 0) {
            rx_batch_abort(&b);
            failed = 1;
        }
    }
    if (n) xsk_ring_cons__release(&self->rx, n);
    refill(self);
    wakeup_fill(self);
    return failed ? NULL : rx_batch_finish(&b);
}

/* Completed TX frames back to the free stack. */
static void reclaim(XskSocket *self) {
    uint32_t idx = 0, n, i;
    n = xsk_ring_cons__peek(&self->cq, self->frame_count, &idx);
    for (i = 0; i < n; i++) {
        uint64_t a = *xsk_ring_cons__comp_addr(&self->cq, idx + i);
        if (self->n_free < self->frame_count && a < self->area_size)
            self->free_frames[self->n_free++] = a - (a % self->frame_size);
    }
    if (n) xsk_ring_cons__release(&self->cq, n);
}

/* Copy mode transmits at most 32 frames per kick (TX_BATCH_SIZE in net/xdp/xsk.c): kick
 * until the kernel has consumed the ring, a bounded number of times; then reclaim the
 * completed frames. -1 with an exception set on a real error. */
static int kick_tx(XskSocket *self) {
    uint32_t kicks = 0, max_kicks = self->tx.size / 32 + 2;
    int rc, err;
    while (kicks < max_kicks && __atomic_load_n(self->tx.consumer, __ATOMIC_ACQUIRE) != *self->tx.producer) {
        kicks++;
        self->tx_kicks++;
        self->busy++;
        Py_BEGIN_ALLOW_THREADS
        rc = sendto(self->fd, NULL, 0, MSG_DONTWAIT, NULL, 0);
        err = errno;
        Py_END_ALLOW_THREADS
        self->busy--;
        if (rc < 0 && err != EAGAIN && err != EBUSY) {
            if (err == ENOBUFS || err == ENETDOWN) break;
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    reclaim(self);
    return 0;
}

/* send_udp(datagrams, template) -> int: each datagram behind a copy of the template's
 * headers (from recv(templates=True)), with IP/UDP lengths and checksums computed here. */
static PyObject *Xsk_send_udp(XskSocket *self, PyObject *args) {
    PyObject *seq;
    Py_buffer tb;
    Py_ssize_t count, k;
    size_t ip_off, udp_off, hdr_len;
    int family;
    const char *why;
    uint8_t tmpl[TEMPLATE_MAX];
    uint32_t n, idx = 0, i;

    if (xsk_closed(self)) return NULL;
    if (!PyArg_ParseTuple(args, "Oy*:send_udp", &seq, &tb)) return NULL;
    if (tb.len > (Py_ssize_t)sizeof(tmpl)) {
        PyBuffer_Release(&tb);
        PyErr_SetString(PyExc_ValueError, "template too long");
        return NULL;
    }
    memcpy(tmpl, tb.buf, (size_t)tb.len);
    hdr_len = (size_t)tb.len;
    PyBuffer_Release(&tb);
    why = check_template(tmpl, hdr_len, &ip_off, &udp_off, &family);
    if (why) { PyErr_Format(PyExc_ValueError, "bad template: %s", why); return NULL; }
    seq = PySequence_Fast(seq, "send_udp() takes a sequence of bytes-like datagrams");
    if (!seq) return NULL;
    count = PySequence_Fast_GET_SIZE(seq);
    for (k = 0; k < count; k++) {
        Py_buffer b;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, k), &b, PyBUF_SIMPLE) < 0) { Py_DECREF(seq); return NULL; }
        if ((size_t)b.len + hdr_len > self->frame_size || b.len > 65507) {
            PyBuffer_Release(&b);
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "datagram %zd: too long for a %u-byte frame", k, self->frame_size);
            return NULL;
        }
        PyBuffer_Release(&b);
    }
    reclaim(self);
    n = (uint32_t)(count > MAX_RECV_BATCH ? MAX_RECV_BATCH : count);
    if (n > self->n_free) n = self->n_free;
    if (n) n = xsk_ring_prod__reserve(&self->tx, n, &idx);
    for (i = 0; i < n; i++) {
        Py_buffer b;
        struct xdp_desc *d = xsk_ring_prod__tx_desc(&self->tx, idx + i);
        uint64_t a = self->free_frames[--self->n_free];
        uint8_t *f = (uint8_t *)self->area + a;
        size_t plen = 0;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &b, PyBUF_SIMPLE) == 0) {
            plen = (size_t)b.len;
            if (plen + hdr_len <= self->frame_size) memcpy(f + hdr_len, b.buf, plen);
            else plen = 0;
            PyBuffer_Release(&b);
        } else {
            PyErr_Clear();
        }
        fill_udp(f, tmpl, hdr_len, ip_off, udp_off, family, plen);
        d->addr = a;
        d->len = (uint32_t)(hdr_len + plen);
    }
    Py_DECREF(seq);
    if (n) {
        xsk_ring_prod__submit(&self->tx, n);
        self->tx_frames += n;
    }
    if (kick_tx(self) < 0) return NULL;
    return PyLong_FromUnsignedLong(n);
}

/* send(frames) -> int: whole Ethernet frames onto the TX ring, then kick the kernel until
 * it has taken them (the datapath itself sends with send_udp). Returns how many were queued; fewer when free frames or TX ring slots run out. The caller builds the
 * headers and checksums. send([]) just kicks and reclaims completed frames. */
static PyObject *Xsk_send(XskSocket *self, PyObject *arg) {
    PyObject *seq;
    Py_ssize_t count, k;
    uint32_t n, idx = 0, i;

    if (xsk_closed(self)) return NULL;
    seq = PySequence_Fast(arg, "send() takes a sequence of bytes-like frames");
    if (!seq) return NULL;
    count = PySequence_Fast_GET_SIZE(seq);
    for (k = 0; k < count; k++) {
        Py_buffer b;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, k), &b, PyBUF_SIMPLE) < 0) { Py_DECREF(seq); return NULL; }
        if (b.len < ETH_HLEN_ || (size_t)b.len > self->frame_size) {
            PyBuffer_Release(&b);
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "frame %zd: length must be in %d..%u", k, ETH_HLEN_, self->frame_size);
            return NULL;
        }
        PyBuffer_Release(&b);
    }
    reclaim(self);
    n = (uint32_t)(count > MAX_RECV_BATCH ? MAX_RECV_BATCH : count);
    if (n > self->n_free) n = self->n_free;
    if (n) n = xsk_ring_prod__reserve(&self->tx, n, &idx);
    for (i = 0; i < n; i++) {
        Py_buffer b;
        struct xdp_desc *d = xsk_ring_prod__tx_desc(&self->tx, idx + i);
        uint64_t a = self->free_frames[--self->n_free];
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &b, PyBUF_SIMPLE) < 0) {
            /* cannot happen after the check above, but keep the ring consistent */
            PyErr_Clear();
            b.len = 0;
            b.buf = NULL;
        }
        if (b.buf && (size_t)b.len <= self->frame_size) memcpy((char *)self->area + a, b.buf, (size_t)b.len);
        d->addr = a;
        d->len = b.buf ? (uint32_t)b.len : 0;
        if (b.buf) PyBuffer_Release(&b);
    }
    Py_DECREF(seq);
    if (n) {
        xsk_ring_prod__submit(&self->tx, n);
        self->tx_frames += n;
    }
    if (kick_tx(self) < 0) return NULL;
    return PyLong_FromUnsignedLong(n);
}

static PyObject *Xsk_poll(XskSocket *self, PyObject *args) {
    int timeout_ms = 0, rc;
    struct pollfd pfd;
    if (!PyArg_ParseTuple(args, "|i:poll", &timeout_ms)) return NULL;
    if (xsk_closed(self)) return NULL;
    if (timeout_ms < -1 || timeout_ms > 60000) {
        PyErr_SetString(PyExc_ValueError, "timeout_ms must be in -1..60000");
        return NULL;
    }
    if (timeout_ms < 0) timeout_ms = 60000;          /* bounded: never wait forever */
    pfd.fd = self->fd;
    pfd.events = POLLIN;
    pfd.revents = 0;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = poll(&pfd, 1, timeout_ms);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (rc < 0) {
        if (errno == EINTR) { if (PyErr_CheckSignals()) return NULL; Py_RETURN_FALSE; }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBool_FromLong(rc > 0 && (pfd.revents & POLLIN));
}

static PyObject *Xsk_stats(XskSocket *self, PyObject *noargs) {
    struct xdp_statistics st;
    socklen_t len = sizeof(st);
    if (xsk_closed(self)) return NULL;
    memset(&st, 0, sizeof(st));
    if (getsockopt(self->fd, SOL_XDP, XDP_STATISTICS, &st, &len) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsKsK}",
                         "tx_frames", self->tx_frames, "tx_kicks", self->tx_kicks,
                         "rx_frames", self->rx_frames, "rx_bytes", self->rx_bytes,
                         "rx_malformed", self->rx_malformed, "rx_chained", self->rx_chained,
                         "rx_gathered", self->rx_gathered,
                         "fill_wakeups", self->wakeups,
                         "rx_dropped", (unsigned long long)st.rx_dropped,
                         "rx_invalid_descs", (unsigned long long)st.rx_invalid_descs,
                         "rx_ring_full", (unsigned long long)st.rx_ring_full,
                         "rx_fill_ring_empty_descs", (unsigned long long)st.rx_fill_ring_empty_descs);
}

static PyObject *Xsk_close(XskSocket *self, PyObject *noargs) {
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "AF_XDP socket is in use by another thread");
        return NULL;
    }
    release_all(self);
    Py_RETURN_NONE;
}

static PyObject *Xsk_enter(XskSocket *self, PyObject *noargs) { return Py_NewRef(self); }

static PyObject *Xsk_exit(XskSocket *self, PyObject *args) { return Xsk_close(self, NULL); }

static PyObject *Xsk_get_zerocopy(XskSocket *self, void *c) { return PyBool_FromLong(self->zerocopy); }
static PyObject *Xsk_get_sg(XskSocket *self, void *c) { return PyBool_FromLong(self->sg); }
static PyObject *Xsk_get_queue(XskSocket *self, void *c) { return PyLong_FromUnsignedLong(self->queue_id); }
static PyObject *Xsk_get_ifindex(XskSocket *self, void *c) { return PyLong_FromUnsignedLong(self->ifindex); }
static PyObject *Xsk_get_closed(XskSocket *self, void *c) { return PyBool_FromLong(self->xsk == NULL); }
static PyObject *Xsk_get_ifname(XskSocket *self, void *c) { return PyUnicode_FromString(self->ifname); }

static PyMethodDef Xsk_methods[] = {
    {"fileno", (PyCFunction)Xsk_fileno, METH_NOARGS, "fileno() -> the AF_XDP socket's fd (for XSKMAP and add_reader)"},
    {"fd", (PyCFunction)Xsk_fileno, METH_NOARGS, "fd() -> the AF_XDP socket's fd (same as fileno())"},
    {"recv", (PyCFunction)(void (*)(void))Xsk_recv, METH_VARARGS | METH_KEYWORDS,
     "recv(max_n=64, v4mapped=False, templates=False, gro=True) -> [(payload, addr) or (buffer, addr,\n"
     "segment_size)]: the UDP payloads of up to max_n frames waiting on the RX ring, one flow's\n"
     "consecutive datagrams joined as UDP GRO joins them; with templates, (entries, {addr: template})"},
    {"send", (PyCFunction)Xsk_send, METH_O,
     "send(frames) -> int: queue whole Ethernet frames on the TX ring and kick the kernel"},
    {"send_udp", (PyCFunction)Xsk_send_udp, METH_VARARGS,
     "send_udp(datagrams, template) -> int: UDP datagrams behind a reply template from recv(templates=True)"},
    {"poll", (PyCFunction)Xsk_poll, METH_VARARGS, "poll(timeout_ms=0) -> bool: frames are waiting"},
    {"stats", (PyCFunction)Xsk_stats, METH_NOARGS, "stats() -> dict of user-space and kernel (XDP_STATISTICS) counters"},
    {"close", (PyCFunction)Xsk_close, METH_NOARGS, "close(): delete the socket and its UMEM (idempotent)"},
    {"__enter__", (PyCFunction)Xsk_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Xsk_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Xsk_getset[] = {
    {"zerocopy", (getter)Xsk_get_zerocopy, NULL, "True if the kernel bound it in zero-copy mode", NULL},
    {"sg", (getter)Xsk_get_sg, NULL, "True if bound with XDP_USE_SG (packets longer than a frame come in pieces)", NULL},
    {"queue_id", (getter)Xsk_get_queue, NULL, "the RX queue it is bound to", NULL},
    {"ifindex", (getter)Xsk_get_ifindex, NULL, "the interface index", NULL},
    {"ifname", (getter)Xsk_get_ifname, NULL, "the interface name", NULL},
    {"closed", (getter)Xsk_get_closed, NULL, "True after close()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject XskSocketType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stcp._xsk.XskSocket",
    .tp_basicsize = sizeof(XskSocket),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "XskSocket(ifname, queue_id, frame_count=4096, frame_size=4096, ring_size=2048, zerocopy=None, sg=True)\n\n"
              "An AF_XDP socket and its UMEM bound to one RX queue (no XDP program loaded).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Xsk_init,
    .tp_dealloc = (destructor)Xsk_dealloc,
    .tp_methods = Xsk_methods,
    .tp_getset = Xsk_getset,
};

static struct PyModuleDef xsk_module = {
    PyModuleDef_HEAD_INIT, "stcp._xsk", "AF_XDP (libxdp): UMEM, rings, batch receive and transmit.", -1,
    xsk_frame_functions,
};

PyMODINIT_FUNC PyInit__xsk(void) {
    PyObject *m;
    if (PyType_Ready(&XskSocketType) < 0) return NULL;
    m = PyModule_Create(&xsk_module);
    if (!m) return NULL;
    if (PyModule_AddFunctions(m, xsk_gro_functions) < 0) { Py_DECREF(m); return NULL; }
    if (PyModule_AddObjectRef(m, "XskSocket", (PyObject *)&XskSocketType) < 0 ||
        PyModule_AddIntConstant(m, "MAX_RECV_BATCH", MAX_RECV_BATCH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
