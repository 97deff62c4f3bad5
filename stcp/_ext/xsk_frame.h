/*
 * What stcp._xsk's two files share: the Ethernet/IP/UDP frame parser and the reply
 * builder (xsk_frame.c), used by the socket's receive and transmit (xsk.c).
 */
#ifndef STCP_XSK_FRAME_H
#define STCP_XSK_FRAME_H

#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#define ETH_HLEN_ 14
#define ETH_P_IP_ 0x0800
#define ETH_P_IPV6_ 0x86DD
#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8
#define IPPROTO_UDP_ 17
#define IPV6_EXT_MAX 6
/* the longest reply template: Ethernet with a VLAN tag, IPv6, UDP */
#define TEMPLATE_MAX (18 + 40 + 8)

struct parsed {
    const uint8_t *payload;
    uint32_t payload_len;
    int family;                     /* 4 or 6 */
    uint8_t src[16];                /* 4 or 16 bytes used */
    uint8_t dst[16];
    uint16_t sport, dport;          /* host order */
    const uint8_t *eth;             /* the frame: MAC addresses */
    uint8_t macs[12];               /* a copy of them, for comparing flows */
    int vlan_tci;                   /* -1: untagged */
    uint16_t vlan_proto;            /* the tag's protocol, 802.1Q or 802.1ad, written back in replies */
};

/* Parse an Ethernet frame down to its UDP payload, every read checked against len:
 * NULL on success, else a static reason. No Python calls. */
const char *parse_frame_raw(const uint8_t *f, size_t len, struct parsed *out);

/* The same for a packet of len bytes of which only f[0..head) is at hand (the first piece
 * of a packet that arrived in several frames): every header read checked against head,
 * the lengths the headers claim against len. out->payload points into f, and only its
 * first head - (out->payload - f) bytes (which may be none) are there to read. */
const char *parse_frame_head(const uint8_t *f, size_t head, size_t len, struct parsed *out);

/* The sender's address as the socket module would give it: (host, port) for IPv4;
 * (host, port, 0, scope_id) for IPv6, or for IPv4 as ::ffff:a.b.c.d when v4mapped. */
PyObject *make_addr(const struct parsed *p, int v4mapped, unsigned int ifindex);

/* The headers of a reply to p (bytes, at most TEMPLATE_MAX long): lengths and checksums
 * are left for fill_udp(). */
PyObject *reply_template(const struct parsed *p);

/* Checks a template: NULL with the offsets of its IP and UDP headers and its family, or a
 * static reason. */
const char *check_template(const uint8_t *t, size_t len, size_t *ip_off, size_t *udp_off, int *family);

/* f holds the payload at f + hdr_len: write the template's headers in front of it with
 * lengths and checksums filled in. No Python calls. */
void fill_udp(uint8_t *f, const uint8_t *tmpl, size_t hdr_len, size_t ip_off, size_t udp_off, int family,
              size_t plen);

/* The module's functions over frames as bytes: parse_frame, reply_template, udp_frame. */
extern PyMethodDef xsk_frame_functions[];

#endif
