/* SPDX-License-Identifier: Apache-2.0 */
/* STCP handshake cookies in the kernel (docs/PROTOCOL.md section 4.5), included by stcp_xdp.c.
 *
 *   cookie = SipHash-2-4-128(key, src_addr (16, IPv4 as ::ffff:a.b.c.d) || src_port (u16)
 *                                 || client_cid (8, as on the wire) || E (32))
 *
 * The same function as stcp/siphash.py and stcp/_ext/siphash.c (tests/test_xdp_cookie.py
 * checks the kernel's cookies against them). The keys are the server's current and
 * previous cookie secrets, which it writes into stcp_cookie whenever it rotates them
 * (stcp/datapath/xdp_cookie.py), so a cookie made here verifies in user space and the
 * other way round.
 *
 * SipHash is 64-bit adds, rotations and xors: unrolled, one MAC is some 400 instructions
 * and no loop the verifier has to bound. A hello costs at most two (current and previous
 * key), and only once it has passed its source prefix's bucket.
 *
 * A COOKIE reply is built in place of the hello that asked for it: same length (a hello
 * and a COOKIE record are both 136 bytes, so the reply amplifies nothing), addresses,
 * ports and MACs swapped, and sent back out of the interface with XDP_TX. Its UDP
 * checksum is computed afresh with bpf_csum_diff (pseudo-header and 144 bytes of UDP),
 * not updated from the hello's: a hello from a sender on this host (a container behind
 * a veth) carries only the partial checksum that checksum offload leaves for the NIC,
 * and an update of that would give a reply its receiver drops.
 */
#ifndef STCP_COOKIE_H
#define STCP_COOKIE_H

#include "stcp_wire.h"

/* A version 2 CLIENT_HELLO payload (PROTOCOL.md section 4.1), 112 bytes. */
struct stcp_hello {
	__u8 type;
	__u8 version;
	__u8 suite;
	__u8 flags;
	__u8 reserved[4];
	__u64 client_cid;       /* wire bytes */
	__u64 e[4];             /* the client's ephemeral public key E */
	__u64 cookie[2];        /* STCP_CLIENT_HELLO_COOKIE_OFFSET */
	__u64 padding[6];       /* zero in a well-formed hello */
};

/* The bytes of a hello that a COOKIE reply rewrites: the header's cid and seq and the
 * first 64 bytes of the payload (the rest is zero padding in both). */
struct stcp_cookie_region {
	__u64 cid;              /* header: the client's CID, as on the wire */
	__u64 seq;              /* header: 0 */
	__u8 type;              /* STCP_HS_COOKIE */
	__u8 version;
	__u8 suite;             /* the hello's, echoed */
	__u8 flags;
	__u8 reserved[4];
	__u64 zero1;            /* payload bytes 8..15 */
	__u64 cookie[2];        /* payload bytes 16..31 */
	__u64 zero2[4];         /* payload bytes 32..63 */
};

/* SipHash reads its input and key as little-endian words. */
static __always_inline __u64 le64(__u64 x)
{
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	return __builtin_bswap64(x);
#else
	return x;
#endif
}

static __always_inline __u64 le16(__u16 x)
{
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	return __builtin_bswap16(x);
#else
	return x;
#endif
}

#define SIP_ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                   \
	do {                                                                       \
		v0 += v1; v1 = SIP_ROTL(v1, 13); v1 ^= v0; v0 = SIP_ROTL(v0, 32);  \
		v2 += v3; v3 = SIP_ROTL(v3, 16); v3 ^= v2;                         \
		v0 += v3; v3 = SIP_ROTL(v3, 21); v3 ^= v0;                         \
		v2 += v1; v1 = SIP_ROTL(v1, 17); v1 ^= v2; v2 = SIP_ROTL(v2, 32);  \
	} while (0)

/* SipHash-2-4 with the 128-bit output (the reference implementation's outlen = 16) of
 * the eight words w: seven full words and the last, which carries the length. */
static __always_inline void siphash128(const __u64 *key, const __u64 *w, __u64 *out)
{
	__u64 k0 = le64(key[0]), k1 = le64(key[1]);
	__u64 v0 = 0x736f6d6570736575ULL ^ k0;
	__u64 v1 = 0x646f72616e646f6dULL ^ k1 ^ 0xee;
	__u64 v2 = 0x6c7967656e657261ULL ^ k0;
	__u64 v3 = 0x7465646279746573ULL ^ k1;
	int i;

#pragma unroll
	for (i = 0; i < 8; i++) {
		v3 ^= w[i];
		SIPROUND;
		SIPROUND;
		v0 ^= w[i];
	}
	v2 ^= 0xee;
	SIPROUND; SIPROUND; SIPROUND; SIPROUND;
	out[0] = v0 ^ v1 ^ v2 ^ v3;
	v1 ^= 0xdd;
	SIPROUND; SIPROUND; SIPROUND; SIPROUND;
	out[1] = v0 ^ v1 ^ v2 ^ v3;
}

/* The cookie input as SipHash's eight words: src (16) || port (2) || cid (8) || E (32) is
 * 58 bytes, so everything after the address sits two bytes off a word boundary, and the
 * last word holds E's last two bytes and the length (58) in its top byte. */
static __always_inline void cookie_words(__u64 *w, const struct stcp_src *src, __be16 port,
					 const struct stcp_hello *h)
{
	__u64 cid = le64(h->client_cid);
	__u64 e0 = le64(h->e[0]), e1 = le64(h->e[1]), e2 = le64(h->e[2]), e3 = le64(h->e[3]);

	w[0] = le64(*(__u64 *)&src->addr[0]);
	w[1] = le64(*(__u64 *)&src->addr[2]);
	w[2] = le16(port) | (cid << 16);
	w[3] = (cid >> 48) | (e0 << 16);
	w[4] = (e0 >> 48) | (e1 << 16);
	w[5] = (e1 >> 48) | (e2 << 16);
	w[6] = (e2 >> 48) | (e3 << 16);
	w[7] = (e3 >> 48) | (58ULL << 56);
}

/* 1 if the hello's cookie field is the MAC mac (all 16 bytes compared, no early exit). */
static __always_inline int cookie_equal(const __u64 *mac, const struct stcp_hello *h)
{
	return ((le64(h->cookie[0]) ^ mac[0]) | (le64(h->cookie[1]) ^ mac[1])) == 0;
}

/* 1 if the hello's cookie verifies under the current or the previous key. mac receives
 * the cookie under the current key: what a COOKIE reply carries. */
static __always_inline int cookie_verify(const struct stcp_cookie_keys *keys, const __u64 *w,
					 const struct stcp_hello *h, __u64 *mac)
{
	__u64 prev[2];

	siphash128(keys->current_key, w, mac);
	if (cookie_equal(mac, h))
		return 1;
	if (!keys->has_previous)
		return 0;
	siphash128(keys->previous_key, w, prev);
	return cookie_equal(prev, h);
}

/* A well-formed version 2 hello that a COOKIE can answer: version 2, a client CID, zero
 * padding. Anything else goes to user space (or is dropped) as before: user space
 * answers it with REJECT_VERSION or not at all, never with a COOKIE. */
static __always_inline int hello_takes_cookie(const struct stcp_hello *h)
{
	return h->version == STCP_PROTOCOL_VERSION && h->client_cid != 0 &&
	       (h->padding[0] | h->padding[1] | h->padding[2] | h->padding[3] | h->padding[4] |
		h->padding[5]) == 0;
}

/* 1 if a reply to this frame can be built here: IPv4 without options or IPv6 without
 * extension headers (a reply must not reflect source routes or options), between unicast
 * addresses (never toward a multicast, broadcast, loopback or unspecified source, nor
 * from a multicast destination). */
static __always_inline int cookie_reply_ok(void *ip, void *data_end, int v4)
{
	if (v4) {
		struct iphdr *iph = ip;
		__u8 s, d;

		if ((void *)(iph + 1) > data_end || iph->ihl != 5)
			return 0;
		s = ((__u8 *)&iph->saddr)[0];
		d = ((__u8 *)&iph->daddr)[0];
		return s != 0 && s != 127 && s < 224 && d < 224;
	} else {
		struct ipv6hdr *ip6h = ip;
		__u32 *s;

		if ((void *)(ip6h + 1) > data_end || ip6h->nexthdr != IPPROTO_UDP)
			return 0;
		if (ip6h->saddr.s6_addr[0] == 0xff || ip6h->daddr.s6_addr[0] == 0xff)
			return 0;
		s = ip6h->saddr.s6_addr32;
		/* :: and ::1 */
		return (s[0] | s[1] | s[2]) != 0 || (s[3] != 0 && s[3] != bpf_htonl(1));
	}
}

/* The IPv6 pseudo-header (RFC 8200 section 8.1); IPv4's is the first 12 bytes' shape. */
struct pseudo6 {
	struct in6_addr saddr;
	struct in6_addr daddr;
	__be32 len;
	__u8 zero[3];
	__u8 nexthdr;
};

struct pseudo4 {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 protocol;
	__be16 len;
};

static __always_inline __u16 fold_csum(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

/* Turn the hello into its COOKIE reply, in place (the caller checked cookie_reply_ok and
 * took a token from the prefix's reply bucket). 0 on success. */
static __always_inline int cookie_reply_write(void *data, void *data_end, void *ip, int v4,
					      struct udphdr *udp, struct stcp_hdr *hdr,
					      const struct stcp_hello *h, const __u64 *mac)
{
	struct ethhdr *eth = data;
	struct stcp_cookie_region *old = (void *)&hdr->cid;
	struct stcp_cookie_region reply = {};
	unsigned char mac_tmp[ETH_ALEN];
	/* the UDP header and the record: a hello and its COOKIE fill exactly this */
	__u32 udp_words = (sizeof(struct udphdr) + STCP_HANDSHAKE_RECORD_LEN) / 4;
	__s64 sum;

	if ((void *)(eth + 1) > data_end || (void *)(udp + 1) > data_end || (void *)(h + 1) > data_end ||
	    (void *)(old + 1) > data_end || (void *)udp + udp_words * 4 > data_end)
		return -1;
	reply.cid = h->client_cid;
	reply.type = STCP_HS_COOKIE;
	reply.version = STCP_PROTOCOL_VERSION;
	reply.suite = h->suite;
	reply.cookie[0] = le64(mac[0]);
	reply.cookie[1] = le64(mac[1]);

	__builtin_memcpy(old, &reply, sizeof(reply));

	__builtin_memcpy(mac_tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac_tmp, ETH_ALEN);
	{
		__be16 p = udp->source;

		udp->source = udp->dest;
		udp->dest = p;
	}
	udp->check = 0;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)udp, udp_words * 4, 0);
	if (v4) {
		struct iphdr *iph = ip;
		struct pseudo4 ph = {};
		__be32 a;
		__u16 *w = ip;
		__u32 s = 0;
		int i;

		if ((void *)(iph + 1) > data_end)
			return -1;
		a = iph->saddr;
		iph->saddr = iph->daddr;
		iph->daddr = a;
		iph->ttl = 64;
		iph->check = 0;
#pragma unroll
		for (i = 0; i < (int)(sizeof(*iph) / 2); i++)
			s += w[i];
		iph->check = fold_csum(s);
		ph.saddr = iph->saddr;
		ph.daddr = iph->daddr;
		ph.protocol = IPPROTO_UDP;
		ph.len = udp->len;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), sum);
	} else {
		struct ipv6hdr *ip6h = ip;
		struct pseudo6 ph = {};

		if ((void *)(ip6h + 1) > data_end)
			return -1;
		ph.saddr = ip6h->daddr;
		ph.daddr = ip6h->saddr;
		ip6h->saddr = ph.saddr;
		ip6h->daddr = ph.daddr;
		ip6h->hop_limit = 64;
		ph.len = bpf_htonl(bpf_ntohs(udp->len));
		ph.nexthdr = IPPROTO_UDP;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), sum);
	}
	if (sum < 0)
		return -1;
	udp->check = fold_csum(sum) ?: 0xffff;
	return 0;
}

#endif /* STCP_COOKIE_H */
