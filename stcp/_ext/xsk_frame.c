/*
 * stcp._xsk, frames: the Ethernet/IP/UDP parser that recv() runs on every frame of the RX
 * ring, and the reply headers that send_udp() puts in front of every datagram it sends.
 *
 * The parser takes Ethernet with one optional VLAN tag, IPv4 (options skipped) or IPv6
 * (hop-by-hop, routing and destination options walked; fragments refused) and UDP; every
 * read is bounds-checked against the frame's length, and what does not parse gets a
 * reason, never a guess.  parse_frame(), reply_template() and udp_frame() run the same
 * code on bytes objects, so tests can fuzz it without a socket.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <stdint.h>
#include <arpa/inet.h>
#include <sys/socket.h>

#include "xsk_frame.h"

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

/* 0 on success, else a static reason. */
const char *parse_frame_raw(const uint8_t *f, size_t len, struct parsed *out) {
    return parse_frame_head(f, len, len, out);
}

/* The headers are read from f[0..head), each read checked against head; the lengths they
 * claim are checked against len, the whole packet's (head <= len). */
const char *parse_frame_head(const uint8_t *f, size_t head, size_t len, struct parsed *out) {
    size_t off = ETH_HLEN_;
    uint16_t proto;
    const uint8_t *udp;
    size_t l4;

    if (head > len) head = len;
    if (head < ETH_HLEN_) return "frame shorter than an Ethernet header";
    out->eth = f;
    memcpy(out->macs, f, 12);
    out->vlan_tci = -1;
    out->vlan_proto = 0;
    proto = rd16(f + 12);
    if (proto == ETH_P_8021Q_ || proto == ETH_P_8021AD_) {
        if (head < off + 4) return "truncated VLAN tag";
        out->vlan_tci = rd16(f + off);
        out->vlan_proto = proto;
        proto = rd16(f + off + 2);
        off += 4;
    }
    if (proto == ETH_P_IP_) {
        const uint8_t *ip = f + off;
        size_t ihl, tot;
        if (head < off + 20) return "truncated IPv4 header";
        if ((ip[0] >> 4) != 4) return "IPv4 header with another version";
        ihl = (size_t)(ip[0] & 0x0F) * 4;
        if (ihl < 20) return "IPv4 header length below 20";
        if (head < off + ihl) return "truncated IPv4 options";
        tot = rd16(ip + 2);
        if (tot < ihl || len < off + tot) return "IPv4 total length outside the frame";
        if (ip[9] != IPPROTO_UDP_) return "not UDP";
        if (rd16(ip + 6) & 0x3FFF) return "IPv4 fragment";
        out->family = 4;
        memcpy(out->src, ip + 12, 4);
        memcpy(out->dst, ip + 16, 4);
        l4 = off + ihl;
        len = off + tot;            /* Ethernet padding beyond the IP packet is not ours */
        if (head > len) head = len;
    } else if (proto == ETH_P_IPV6_) {
        const uint8_t *ip = f + off;
        uint8_t next;
        size_t plen;
        int i;
        if (head < off + 40) return "truncated IPv6 header";
        if ((ip[0] >> 4) != 6) return "IPv6 header with another version";
        plen = rd16(ip + 4);
        if (len < off + 40 + plen) return "IPv6 payload length outside the frame";
        len = off + 40 + plen;
        if (head > len) head = len;
        out->family = 6;
        memcpy(out->src, ip + 8, 16);
        memcpy(out->dst, ip + 24, 16);
        next = ip[6];
        l4 = off + 40;
        for (i = 0; i < IPV6_EXT_MAX && next != IPPROTO_UDP_; i++) {
            if (next == 0 || next == 43 || next == 60) {     /* hop-by-hop, routing, dst opts */
                if (head < l4 + 2) return "truncated IPv6 extension header";
                next = f[l4];
                l4 += ((size_t)f[l4 + 1] + 1) * 8;
                if (l4 > len) return "IPv6 extension header outside the frame";
            } else if (next == 44) {
                return "IPv6 fragment";
            } else {
                return "not UDP";
            }
        }
        if (next != IPPROTO_UDP_) return "not UDP";
    } else {
        return "neither IPv4 nor IPv6";
    }
    if (head < l4 + 8) return "truncated UDP header";
    udp = f + l4;
    {
        size_t ulen = rd16(udp + 4);
        if (ulen < 8) return "UDP length below 8";
        if (l4 + ulen > len) return "UDP length outside the packet";
        out->sport = rd16(udp);
        out->dport = rd16(udp + 2);
        out->payload = udp + 8;
        out->payload_len = (uint32_t)(ulen - 8);
    }
    return NULL;
}

/* (host, port) for IPv4; (host, port, 0, scope_id) for IPv6, or for IPv4 as ::ffff:a.b.c.d
 * when v4mapped (what an AF_INET6 socket would have reported). */
PyObject *make_addr(const struct parsed *p, int v4mapped, unsigned int ifindex) {
    char host[INET6_ADDRSTRLEN];
    if (p->family == 4) {
        if (!v4mapped) {
            if (!inet_ntop(AF_INET, p->src, host, sizeof(host))) return PyErr_SetFromErrno(PyExc_OSError);
            return Py_BuildValue("(si)", host, (int)p->sport);
        } else {
            uint8_t m[16] = {0};
            m[10] = m[11] = 0xff;
            memcpy(m + 12, p->src, 4);
            if (!inet_ntop(AF_INET6, m, host, sizeof(host))) return PyErr_SetFromErrno(PyExc_OSError);
            return Py_BuildValue("(siII)", host, (int)p->sport, 0u, 0u);
        }
    }
    if (!inet_ntop(AF_INET6, p->src, host, sizeof(host))) return PyErr_SetFromErrno(PyExc_OSError);
    /* link-local sources need the interface to be answered */
    unsigned int scope = (p->src[0] == 0xfe && (p->src[1] & 0xc0) == 0x80) ? ifindex : 0;
    return Py_BuildValue("(siII)", host, (int)p->sport, 0u, scope);
}

/* The headers of a reply to p: Ethernet (MACs swapped, VLAN tag kept as it arrived:
 * 802.1Q or 802.1ad, the same TCI), IPv4 (no options,
 * DF, TTL 64) or IPv6 (hop limit 64), UDP (ports swapped); lengths and checksums are
 * filled per datagram by send_udp(). */
PyObject *reply_template(const struct parsed *p) {
    uint8_t t[TEMPLATE_MAX];
    size_t n = 0;
    memcpy(t, p->eth + 6, 6);                   /* to the sender's MAC */
    memcpy(t + 6, p->eth, 6);                   /* from ours */
    n = 12;
    if (p->vlan_tci >= 0) {
        t[n++] = (uint8_t)(p->vlan_proto >> 8); t[n++] = (uint8_t)p->vlan_proto;
        t[n++] = (uint8_t)(p->vlan_tci >> 8); t[n++] = (uint8_t)p->vlan_tci;
    }
    if (p->family == 4) {
        t[n++] = 0x08; t[n++] = 0x00;
        memset(t + n, 0, 20);
        t[n] = 0x45;
        t[n + 6] = 0x40;                        /* DF */
        t[n + 8] = 64;
        t[n + 9] = IPPROTO_UDP_;
        memcpy(t + n + 12, p->dst, 4);
        memcpy(t + n + 16, p->src, 4);
        n += 20;
    } else {
        t[n++] = 0x86; t[n++] = 0xDD;
        memset(t + n, 0, 40);
        t[n] = 0x60;
        t[n + 6] = IPPROTO_UDP_;
        t[n + 7] = 64;
        memcpy(t + n + 8, p->dst, 16);
        memcpy(t + n + 24, p->src, 16);
        n += 40;
    }
    t[n] = (uint8_t)(p->dport >> 8); t[n + 1] = (uint8_t)p->dport;
    t[n + 2] = (uint8_t)(p->sport >> 8); t[n + 3] = (uint8_t)p->sport;
    memset(t + n + 4, 0, 4);
    n += 8;
    return PyBytes_FromStringAndSize((const char *)t, (Py_ssize_t)n);
}

static uint32_t csum_add(uint32_t sum, const uint8_t *b, size_t len) {
    size_t i;
    for (i = 0; i + 1 < len; i += 2) sum += (uint32_t)((b[i] << 8) | b[i + 1]);
    if (len & 1) sum += (uint32_t)(b[len - 1] << 8);
    return sum;
}

static uint16_t csum_fold(uint32_t sum) {
    while (sum >> 16) sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)~sum;
}

/* Checks a template (from reply_template, or from anyone): returns the offsets of the IP
 * and UDP headers and the family, or NULL with a reason. */
const char *check_template(const uint8_t *t, size_t len, size_t *ip_off, size_t *udp_off, int *family) {
    size_t off = 12;
    uint16_t proto;
    if (len < 14) return "template shorter than an Ethernet header";
    proto = rd16(t + 12);
    if (proto == ETH_P_8021Q_ || proto == ETH_P_8021AD_) {
        if (len < 18) return "truncated VLAN tag";
        proto = rd16(t + 16);
        off = 16;
    }
    off += 2;
    if (proto == ETH_P_IP_) {
        if (len != off + 20 + 8 || t[off] != 0x45 || t[off + 9] != IPPROTO_UDP_) return "not an IPv4/UDP template";
        *family = 4;
        *udp_off = off + 20;
    } else if (proto == ETH_P_IPV6_) {
        if (len != off + 40 + 8 || (t[off] >> 4) != 6 || t[off + 6] != IPPROTO_UDP_) return "not an IPv6/UDP template";
        *family = 6;
        *udp_off = off + 40;
    } else {
        return "template is neither IPv4 nor IPv6";
    }
    *ip_off = off;
    return NULL;
}

/* f holds the payload at f + hdr_len; write the template's headers in front of it with
 * lengths and checksums (IPv4 header, UDP over the pseudo-header) filled in. */
void fill_udp(uint8_t *f, const uint8_t *tmpl, size_t hdr_len, size_t ip_off, size_t udp_off, int family,
                     size_t plen) {
    size_t ulen = 8 + plen;
    uint32_t sum;
    uint16_t c;
    memcpy(f, tmpl, hdr_len);
    f[udp_off + 4] = (uint8_t)(ulen >> 8); f[udp_off + 5] = (uint8_t)ulen;
    if (family == 4) {
        size_t tot = 20 + ulen;
        f[ip_off + 2] = (uint8_t)(tot >> 8); f[ip_off + 3] = (uint8_t)tot;
        f[ip_off + 10] = f[ip_off + 11] = 0;
        c = csum_fold(csum_add(0, f + ip_off, 20));
        f[ip_off + 10] = (uint8_t)(c >> 8); f[ip_off + 11] = (uint8_t)c;
        sum = csum_add(0, f + ip_off + 12, 8);
    } else {
        f[ip_off + 4] = (uint8_t)(ulen >> 8); f[ip_off + 5] = (uint8_t)ulen;
        sum = csum_add(0, f + ip_off + 8, 32);
    }
    sum += IPPROTO_UDP_ + (uint32_t)ulen;
    f[udp_off + 6] = f[udp_off + 7] = 0;
    sum = csum_add(sum, f + udp_off, ulen);
    c = csum_fold(sum);
    if (c == 0) c = 0xFFFF;
    f[udp_off + 6] = (uint8_t)(c >> 8); f[udp_off + 7] = (uint8_t)c;
}

/* Parse a frame handed in as a buffer: 0, or -1 with ValueError saying what is wrong. */
static int parse_buffer(const Py_buffer *buf, struct parsed *p) {
    const char *why;
    memset(p, 0, sizeof(*p));
    why = parse_frame_raw((const uint8_t *)buf->buf, (size_t)buf->len, p);
    if (why) {
        PyErr_Format(PyExc_ValueError, "malformed frame: %s", why);
        return -1;
    }
    return 0;
}

/* parse_frame(frame, v4mapped=False, ifindex=0) -> (payload, addr); ValueError if malformed */
static PyObject *xsk_parse_frame(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"frame", "v4mapped", "ifindex", NULL};
    Py_buffer buf;
    int v4mapped = 0;
    unsigned int ifindex = 0;
    struct parsed p;
    PyObject *payload, *a, *res;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*|pI:parse_frame", kwlist, &buf, &v4mapped, &ifindex))
        return NULL;
    if (parse_buffer(&buf, &p) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    payload = PyBytes_FromStringAndSize((const char *)p.payload, p.payload_len);
    PyBuffer_Release(&buf);
    if (!payload) return NULL;
    a = make_addr(&p, v4mapped, ifindex);
    if (!a) { Py_DECREF(payload); return NULL; }
    res = PyTuple_Pack(2, payload, a);
    Py_DECREF(payload);
    Py_DECREF(a);
    return res;
}

/* udp_frame(template, payload) -> bytes: what send_udp() puts on the wire */
static PyObject *xsk_udp_frame(PyObject *mod, PyObject *args) {
    Py_buffer tb, pb;
    size_t ip_off, udp_off;
    int family;
    const char *why;
    PyObject *out;
    if (!PyArg_ParseTuple(args, "y*y*:udp_frame", &tb, &pb)) return NULL;
    why = tb.len > TEMPLATE_MAX ? "template too long" : check_template(tb.buf, (size_t)tb.len, &ip_off, &udp_off, &family);
    if (why || pb.len > 65507) {
        PyErr_Format(PyExc_ValueError, "bad template: %s", why ? why : "payload too long");
        PyBuffer_Release(&tb); PyBuffer_Release(&pb);
        return NULL;
    }
    out = PyBytes_FromStringAndSize(NULL, tb.len + pb.len);
    if (out) {
        uint8_t *f = (uint8_t *)PyBytes_AS_STRING(out);
        memcpy(f + tb.len, pb.buf, (size_t)pb.len);
        fill_udp(f, tb.buf, (size_t)tb.len, ip_off, udp_off, family, (size_t)pb.len);
    }
    PyBuffer_Release(&tb); PyBuffer_Release(&pb);
    return out;
}

/* reply_template(frame) -> bytes: the headers of a reply to this frame (ValueError if malformed) */
static PyObject *xsk_reply_template(PyObject *mod, PyObject *arg) {
    Py_buffer buf;
    struct parsed p;
    PyObject *t;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0) return NULL;
    t = parse_buffer(&buf, &p) < 0 ? NULL : reply_template(&p);
    PyBuffer_Release(&buf);
    return t;
}

PyMethodDef xsk_frame_functions[] = {
    {"udp_frame", (PyCFunction)xsk_udp_frame, METH_VARARGS,
     "udp_frame(template, payload) -> bytes: the frame send_udp() would transmit"},
    {"reply_template", (PyCFunction)xsk_reply_template, METH_O,
     "reply_template(frame) -> bytes: Ethernet/IP/UDP headers of a reply to frame"},
    {"parse_frame", (PyCFunction)(void (*)(void))xsk_parse_frame, METH_VARARGS | METH_KEYWORDS,
     "parse_frame(frame, v4mapped=False, ifindex=0) -> (udp_payload, addr); ValueError if malformed"},
    {NULL, NULL, 0, NULL},
};
