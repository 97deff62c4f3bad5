/* SPDX-License-Identifier: Apache-2.0 */
/* STCP XDP datapath: validate STCP records at the earliest point and drop the bad ones.
 *
 * Compiled by bcc at load time (stcp/datapath/xdp.py). The port and limits live in the
 * one-element stcp_config array (struct stcp_config, written by the loader before it
 * attaches); map sizes come in as -D cflags. Uses UAPI headers only: the installed
 * kernel headers may be older than the running kernel.
 *
 * Fail closed: a frame passes untouched (pass_not_stcp) only once the parsers have walked
 * its headers far enough to show it is not UDP to the STCP port: ARP and other EtherTypes,
 * TCP, ICMP, IPsec, UDP to another port. A frame they cannot walk that far is dropped as
 * drop_unparsed: truncated or malformed Ethernet, VLAN, IPv4 or IPv6 headers, a third VLAN
 * tag, an IPv6 extension chain longer than IPV6_EXT_MAX. A later IP fragment of a UDP
 * datagram has no UDP header, so its port cannot be told: it is dropped as drop_fragment
 * whatever its port (STCP never fragments; other UDP services on the interface lose their
 * fragmented datagrams). tests/support/xdp_model.py states these rules in Python and
 * tests/test_xdp_fuzz.py checks the program against it on random and mutated frames.
 *
 * Client hellos: a bucket per source prefix, then a global budget; with the server's
 * cookie keys in stcp_cookie, a hello with a valid cookie skips the global budget and a
 * hello past it is answered here with a COOKIE (XDP_TX, bpf/stcp_cookie.h). Data records:
 * passed for a CID in the live table (ENCRYPTED connections) or the half-open LRU; for
 * any other CID a budgeted few are passed, so the server can answer with a stateless
 * RESET, and the rest dropped.
 *
 * Every path ends in count(), which bumps the per-CPU (packets, bytes) counter of its
 * verdict and returns XDP_PASS, XDP_DROP or XDP_TX. Style after xdp-tutorial: a cursor,
 * small parse helpers, a bounds check before every read.
 */
/* The user-space API headers only: bcc resolves <linux/...> to the kernel's internal
 * headers, whose parsing was most of each compile at attach (about 4 of its 7 CPU seconds). */
#include <uapi/linux/bpf.h>
#include <uapi/linux/types.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/udp.h>

#include "stcp_wire.h"
#include "stcp_cookie.h"

#define VLAN_MAX_DEPTH 2        /* 802.1ad + 802.1Q (QinQ); a third tag is unparsed */
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF
#define IP6_OFFSET 0xFFF8
/* IPv6 extension headers walked. RFC 8200 section 4.1 orders a chain as hop-by-hop,
 * destination options, routing, fragment, (AH, ESP,) destination options, each once: at
 * most 5 of the kinds walked here. A longer chain repeats a header; past 6 it is
 * dropped as unparsed rather than let through unexamined. */
#define IPV6_EXT_MAX 6
#define BUCKET_CAS_TRIES 2      /* compare-and-swap attempts on a contended hello bucket */
#define BUCKET_HELLO 0          /* stcp_buckets: the global hello budget */
#define BUCKET_UNKNOWN_CID 1    /* stcp_buckets: unknown-CID records let through */
#define COOKIE_MODE_UNTIL 2     /* stcp_buckets: cookie mode lasts until this time (ns) */
#define COOKIE_MODE_NS 1000000000ULL    /* ...this long after the last hello over the budget */
#define STCP_BATCH_MAX 64       /* records in one GSO/GRO batch, see batch_ok() */


BPF_PERCPU_ARRAY(stcp_counters, struct stcp_counter, STCP_V_MAX);
/* Connection IDs: the live table holds ENCRYPTED connections' (the server adds one when
 * its connection becomes ENCRYPTED); half-open connections' live in an LRU of their own,
 * so a hello flood cannot fill the live table, and the client's first protected record
 * (the one that confirms the keys) still reaches user space. */
BPF_HASH(stcp_cids, __u64, __u8, STCP_MAX_CIDS);
BPF_TABLE("lru_hash", __u64, __u8, stcp_half_open, STCP_HALF_OPEN);
/* Per source prefix, a hello bucket and a COOKIE-reply bucket (an LRU: a flood of new
 * prefixes evicts old ones, so the global bucket is what bounds a spoofed flood); and
 * buckets for all sources: [BUCKET_HELLO] the global hello budget, [BUCKET_UNKNOWN_CID]
 * unknown-CID records let through; and [COOKIE_MODE_UNTIL]. Values are theoretical arrival
 * times, see bucket_take(). */
BPF_TABLE("lru_hash", struct stcp_src, struct stcp_prefix_buckets, stcp_hs_bucket, STCP_HS_SOURCES);
BPF_ARRAY(stcp_buckets, __u64, 3);
BPF_ARRAY(stcp_config, struct stcp_config, 1);
BPF_ARRAY(stcp_cid_filter, __u64, STCP_CID_FILTER_WORDS);
/* The cookie keys, one element (key 0) or none. A hash without preallocation: an update
 * replaces the element whole, so the program never reads half of one rotation. */
BPF_F_TABLE("hash", __u32, struct stcp_cookie_keys, stcp_cookie, 1, BPF_F_NO_PREALLOC);
#ifdef STCP_AFXDP
/* The afxdp datapath (stcp/datapath/afxdp.py) compiles with -DSTCP_AFXDP: records that pass
 * every check below go to the AF_XDP socket of the RX queue they arrived on; where that
 * queue has no socket, the redirect falls back to XDP_PASS (the kernel UDP socket).
 * The kernel accepts a redirect only into a socket bound to the arrival (device, queue)
 * (xsk_rcv_check), so steering cannot move a record to another queue: it can only check
 * that the record's worker owns the arrival queue, see steer(). */
#ifndef STCP_XSK_MAX
#define STCP_XSK_MAX 64
#endif
BPF_XSKMAP(stcp_xsks, STCP_XSK_MAX);
#endif

struct hdr_cursor {
	void *pos;
};

struct vlan_hdr {
	__be16 h_vlan_TCI;
	__be16 h_vlan_encapsulated_proto;
};

struct ipv6_ext {               /* hop-by-hop, routing, destination options */
	__u8 nexthdr;
	__u8 hdrlen;            /* in 8-byte units, not counting the first 8 */
};

struct ipv6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;        /* offset (13 bits, 8-byte units) | 2 reserved | M */
	__be32 identification;
};

/* How far the L2/L3 parsers got. */
enum parse_result {
	PARSE_UDP,              /* a UDP header should follow, at the cursor */
	PARSE_NOT_UDP,          /* walked to an upper layer that is not UDP */
	PARSE_LATER_FRAGMENT,   /* a later fragment of what may be a UDP datagram */
	PARSE_UNPARSED,         /* the headers cannot be walked to the upper layer */
};

/* What the L3 parsers found besides: a first fragment, and who sent it. */
struct l3_info {
	int fragment;           /* the first fragment of a fragmented datagram */
	int v4;
	void *ip;               /* the IPv4 or IPv6 header */
	struct stcp_src src;    /* full source address, IPv4 as ::ffff:a.b.c.d */
};

static __always_inline int count(struct xdp_md *ctx, __u32 verdict, int action)
{
	struct stcp_counter *c = stcp_counters.lookup(&verdict);

	if (c) {
		c->packets += 1;
		c->bytes += ctx->data_end - ctx->data;
	}
	return action;
}

/* Where a record that passed every check goes: the stack (XDP_PASS), or with -DSTCP_AFXDP
 * the AF_XDP socket of its RX queue. */
static __always_inline int deliver(struct xdp_md *ctx)
{
#ifdef STCP_AFXDP
	return stcp_xsks.redirect_map(ctx->rx_queue_index, XDP_PASS);
#else
	return XDP_PASS;
#endif
}

#ifdef STCP_AFXDP
/* CID steering for a data record whose CID is live. With cfg->nworkers = N > 0, worker W
 * owns the RX queues q with q % N == W and the connections whose CID carries W in its top
 * STCP_CID_WORKER_BITS (it chose that CID when the client hello reached one of its
 * queues). A record whose CID names the worker of its arrival queue goes to that queue's
 * socket. Any other is dropped and counted (STCP_V_DROP_WRONG_WORKER): its flow now hashes
 * to another worker's queue (RSS changed, the peer moved) or it is forged with a CID seen
 * on the path. Passing it instead would hand it to the kernel UDP socket, and through
 * SO_REUSEPORT to a worker chosen by address hash that, as a rule, does not know the CID:
 * user-space work for a record that ends as unknown_cid there. Dropping is the honest
 * outcome, and the counter says why. */
static __always_inline int steer(struct xdp_md *ctx, struct stcp_config *cfg, __u64 raw_cid, __u32 verdict)
{
	__u32 nworkers = cfg->nworkers;
	__u32 worker, owner;

	if (nworkers == 0)              /* not configured: every queue takes every record */
		return count(ctx, verdict, deliver(ctx));
	/* raw_cid is in wire (big-endian) order; its top bits are the worker */
	worker = (__u32)(__builtin_bswap64(raw_cid) >> STCP_CID_WORKER_SHIFT);
	owner = ctx->rx_queue_index % nworkers;
	if (worker != owner)
		return count(ctx, STCP_V_DROP_WRONG_WORKER, XDP_DROP);
	return count(ctx, verdict, deliver(ctx));
}
#endif

static __always_inline int proto_is_vlan(__be16 proto)
{
	return proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD);
}

/* Ethernet plus up to VLAN_MAX_DEPTH 802.1Q / 802.1ad tags; returns the inner EtherType
 * (network order), or -1 when the frame is too short or carries more tags. */
static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end)
{
	struct ethhdr *eth = nh->pos;
	struct vlan_hdr *vlh;
	__be16 proto;
	int i;

	if ((void *)(eth + 1) > data_end)
		return -1;
	nh->pos = eth + 1;
	proto = eth->h_proto;
#pragma unroll
	for (i = 0; i < VLAN_MAX_DEPTH; i++) {
		if (!proto_is_vlan(proto))
			break;
		vlh = nh->pos;
		if ((void *)(vlh + 1) > data_end)
			return -1;
		nh->pos = vlh + 1;
		proto = vlh->h_vlan_encapsulated_proto;
	}
	if (proto_is_vlan(proto))
		return -1;
	return proto;
}

/* IPv4 with options. PARSE_UDP leaves the cursor where the UDP header of a whole datagram
 * or of its first fragment (info->fragment) starts. A later fragment of UDP has no port. */
static __always_inline int parse_ipv4(struct hdr_cursor *nh, void *data_end, struct l3_info *info)
{
	struct iphdr *iph = nh->pos;
	int hdrsize;
	__u16 frag;

	if ((void *)(iph + 1) > data_end)
		return PARSE_UNPARSED;
	hdrsize = iph->ihl * 4;
	if (iph->version != 4 || hdrsize < (int)sizeof(*iph))
		return PARSE_UNPARSED;
	if (nh->pos + hdrsize > data_end)
		return PARSE_UNPARSED;
	nh->pos += hdrsize;
	if (iph->protocol != IPPROTO_UDP)
		return PARSE_NOT_UDP;
	frag = bpf_ntohs(iph->frag_off);
	if (frag & IP_OFFSET)
		return PARSE_LATER_FRAGMENT;
	info->fragment = (frag & IP_MF) != 0;
	info->v4 = 1;
	info->ip = iph;
	info->src.addr[2] = bpf_htonl(0xffff);
	info->src.addr[3] = iph->saddr;
	return PARSE_UDP;
}

/* The extension headers the IPv6 parser walks; any other next header ends the chain
 * (AH and ESP too: the kernel authenticates IPsec before it delivers what is inside). */
static __always_inline int ipv6_walkable(__u8 nexthdr)
{
	return nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
	       nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_FRAGMENT;
}

/* IPv6 and up to IPV6_EXT_MAX extension headers, each wholly inside the frame. A fragment
 * header with offset 0 marks the first fragment and the walk goes on; with another offset
 * the upper layer is in an earlier fragment: UDP, or an extension header that may lead to
 * UDP, makes it a later fragment of what may be STCP. */
static __always_inline int parse_ipv6(struct hdr_cursor *nh, void *data_end, struct l3_info *info)
{
	struct ipv6hdr *ip6h = nh->pos;
	__u8 nexthdr;
	int i;

	if ((void *)(ip6h + 1) > data_end)
		return PARSE_UNPARSED;
	if (ip6h->version != 6)
		return PARSE_UNPARSED;
	nh->pos = ip6h + 1;
	nexthdr = ip6h->nexthdr;

#pragma unroll
	for (i = 0; i < IPV6_EXT_MAX; i++) {
		if (nexthdr == IPPROTO_FRAGMENT) {
			struct ipv6_frag *fh = nh->pos;

			if ((void *)(fh + 1) > data_end)
				return PARSE_UNPARSED;
			nexthdr = fh->nexthdr;
			nh->pos = fh + 1;
			if (bpf_ntohs(fh->frag_off) & IP6_OFFSET) {
				if (nexthdr == IPPROTO_UDP || ipv6_walkable(nexthdr))
					return PARSE_LATER_FRAGMENT;
				return PARSE_NOT_UDP;
			}
			info->fragment = 1;
		} else if (ipv6_walkable(nexthdr)) {
			struct ipv6_ext *ext = nh->pos;

			if ((void *)(ext + 1) > data_end)
				return PARSE_UNPARSED;
			nexthdr = ext->nexthdr;
			nh->pos += (ext->hdrlen + 1) * 8;
			if (nh->pos > data_end)
				return PARSE_UNPARSED;
		} else {
			break;
		}
	}
	if (ipv6_walkable(nexthdr))
		return PARSE_UNPARSED;          /* the chain goes on past IPV6_EXT_MAX */
	if (nexthdr != IPPROTO_UDP)
		return PARSE_NOT_UDP;
	__builtin_memcpy(info->src.addr, &ip6h->saddr, sizeof(info->src.addr));
	info->ip = ip6h;
	return PARSE_UDP;
}

/* The CID prefilter slot of a CID as loaded from the packet (wire byte order): fold the
 * halves, so that the structured top bits of a CID (its worker) mix with random ones.
 * stcp/datapath/xdp.py computes the same function. */
static __always_inline __u32 cid_slot(__u64 raw)
{
	return ((__u32)raw ^ (__u32)(raw >> 32)) & (STCP_CID_FILTER_SLOTS - 1);
}

/* 1 if the prefilter says the CID may be live, 0 if it certainly is not. */
static __always_inline int cid_maybe_live(__u64 raw)
{
	__u32 slot = cid_slot(raw);
	__u32 word = slot >> 3;
	__u64 *w = stcp_cid_filter.lookup(&word);

	if (!w)
		return 0;
	return ((*w >> ((slot & 7) * 8)) & 0xff) != 0;
}

/* Token bucket as a theoretical arrival time (GCRA): the bucket is full when *tat <= now;
 * a hello that fits moves *tat on by cost; it fits while the credit left, cap - (tat -
 * now), covers its cost. One u64 per bucket, so CPUs update it with a compare-and-swap
 * and never pass more than rate and burst allow; a CPU that loses the race
 * BUCKET_CAS_TRIES times (a hello flood on several queues at once) denies. */
static __always_inline int bucket_take(__u64 *tat, __u64 now, __u64 cost, __u64 cap)
{
	__u64 old, base;
	int i;

#pragma unroll
	for (i = 0; i < BUCKET_CAS_TRIES; i++) {
		old = *(volatile __u64 *)tat;
		base = old > now ? old : now;
		if (base - now + cost > cap)
			return 0;
		if (__sync_val_compare_and_swap(tat, old, base + cost) == old)
			return 1;
	}
	return 0;
}

/* Word i (network order) of the mask of a /bits prefix of a 128-bit address. */
static __always_inline __be32 prefix_mask(__u32 bits, int i)
{
	if (bits >= 32 * (i + 1))
		return 0xffffffff;
	if (bits <= 32 * i)
		return 0;
	return bpf_htonl(~0U << (32 * (i + 1) - bits));
}

/* The buckets of the hello's source prefix: IPv4 per /hs_prefix4 (default 32), IPv6 per
 * /hs_prefix6 (default 64: one site's subnet, which one host can fill with addresses).
 * NULL if there is no room for them. */
static __always_inline struct stcp_prefix_buckets *prefix_buckets(struct stcp_config *cfg, struct l3_info *info,
								   __u64 now)
{
	__u32 bits = info->v4 ? 96 + cfg->hs_prefix4 : cfg->hs_prefix6;
	struct stcp_prefix_buckets *b, full = { .hello = now, .cookie = now };
	struct stcp_src key;
	int i;

#pragma unroll
	for (i = 0; i < 4; i++)
		key.addr[i] = info->src.addr[i] & prefix_mask(bits, i);
	b = stcp_hs_bucket.lookup(&key);
	if (!b) {
		stcp_hs_bucket.insert(&key, &full);     /* full buckets; another CPU may win */
		b = stcp_hs_bucket.lookup(&key);
	}
	return b;
}

/* One of the buckets all sources share (stcp_buckets[index]); cost 0: no limit. */
static __always_inline int shared_allows(__u32 index, __u64 now, __u64 cost, __u64 cap)
{
	__u64 *tat;

	if (cost == 0)
		return 1;
	tat = stcp_buckets.lookup(&index);
	if (!tat)
		return 0;
	return bucket_take(tat, now, cost, cap);
}

/* With cookie keys: whether a cookie-less hello may pass, i.e. it is within the global
 * budget and the program is not in cookie mode. A hello over the budget starts cookie mode
 * (or prolongs it) for COOKIE_MODE_NS, in which every cookie-less hello gets a COOKIE even
 * when the bucket has refilled: under a flood the budget would otherwise let its rate of
 * spoofed hellos through to X25519, none of which can ever complete. The bucket is still
 * spent meanwhile, so the mode ends COOKIE_MODE_NS after the rate falls within it. */
static __always_inline int cookieless_allowed(struct stcp_config *cfg, __u64 now)
{
	__u32 index = COOKIE_MODE_UNTIL;
	__u64 *until = stcp_buckets.lookup(&index);

	if (!until)
		return 0;
	if (!shared_allows(BUCKET_HELLO, now, cfg->hs_global_cost_ns, cfg->hs_global_cap_ns)) {
		*until = now + COOKIE_MODE_NS;
		return 0;
	}
	return now >= *until;
}

/* A handshake record (seq 0) at the server's port: only a CLIENT_HELLO is valid here.
 *
 * Every hello spends its source prefix's bucket first. Then, when the server has written
 * cookie keys and the hello is a well-formed version 2 one (PROTOCOL.md section 4.5):
 * - with a cookie that verifies: passed (pass_cookie), without spending the global budget
 *   a spoofed flood has emptied; the cookie proves the client receives at its address.
 * - with a cookie that does not: never passed. It is answered with a fresh COOKIE
 *   (tx_cookie) within the prefix's reply budget, else dropped (drop_bad_cookie). Not
 *   dropped outright: a client holding a forged or outdated COOKIE (anyone who saw its
 *   hello can send it one) gets a good one and loses one round trip, as in user space.
 * - without a cookie: passed within the global budget (pass_handshake); past it, and in
 *   the cookie mode that starts there (cookieless_allowed()), answered with a COOKIE
 *   (tx_cookie) within the prefix's reply budget, else dropped (drop_hs_global).
 * Without keys, or for a version 1 hello or a malformed one (user space answers those
 * with REJECT_VERSION or not at all), the cookie field is not looked at: the global
 * budget passes or drops it. */
static __always_inline int check_hello(struct xdp_md *ctx, struct stcp_config *cfg, struct stcp_hdr *hdr,
				       void *data_end, struct l3_info *info, struct udphdr *udp, __u64 length)
{
	struct stcp_hello *h = (struct stcp_hello *)(hdr + 1);
	__u8 *type = (__u8 *)(hdr + 1);
	struct stcp_prefix_buckets *b;
	struct stcp_cookie_keys *keys;
	__u64 now, w[8], mac[2];
	int valid = 0, has_cookie;
	__u32 zero = 0;

	/* a v2 hello, or a v1 one that user space answers with a v1-layout REJECT */
	if ((length != STCP_HANDSHAKE_PAYLOAD_LEN && length != STCP_V1_HANDSHAKE_PAYLOAD_LEN) ||
	    hdr->cid != 0)
		return count(ctx, STCP_V_DROP_BAD_HANDSHAKE, XDP_DROP);
	if ((void *)(type + 1) > data_end)
		return count(ctx, STCP_V_DROP_BAD_HANDSHAKE, XDP_DROP);
	if (*type != STCP_HS_CLIENT_HELLO)
		return count(ctx, STCP_V_DROP_BAD_HANDSHAKE, XDP_DROP);
	now = bpf_ktime_get_ns();
	b = prefix_buckets(cfg, info, now);
	if (!b || !bucket_take(&b->hello, now, cfg->hs_cost_ns, cfg->hs_cap_ns))
		return count(ctx, STCP_V_DROP_HS_RATE, XDP_DROP);

	/* the cookie keys the server wrote, unless they expired */
	keys = stcp_cookie.lookup(&zero);
	if (!keys || now > keys->expires_ns || length != STCP_HANDSHAKE_PAYLOAD_LEN || (void *)(h + 1) > data_end ||
	    !hello_takes_cookie(h)) {
		if (!shared_allows(BUCKET_HELLO, now, cfg->hs_global_cost_ns, cfg->hs_global_cap_ns))
			return count(ctx, STCP_V_DROP_HS_GLOBAL, XDP_DROP);
		return count(ctx, STCP_V_PASS_HANDSHAKE, deliver(ctx));
	}
	cookie_words(w, &info->src, udp->source, h);
	has_cookie = (h->cookie[0] | h->cookie[1]) != 0;
	if (has_cookie) {
		valid = cookie_verify(keys, w, h, mac);
		if (valid)      /* afxdp: to the arrival queue's socket, as any hello */
			return count(ctx, STCP_V_PASS_COOKIE, deliver(ctx));
	} else if (cookieless_allowed(cfg, now)) {
		return count(ctx, STCP_V_PASS_HANDSHAKE, deliver(ctx));
	} else {
		siphash128(keys->current_key, w, mac);
	}
	/* answer with a COOKIE, within the prefix's reply budget */
	if (cfg->ck_cost_ns && cookie_reply_ok(info->ip, data_end, info->v4) &&
	    bucket_take(&b->cookie, now, cfg->ck_cost_ns, cfg->ck_cap_ns) &&
	    cookie_reply_write((void *)(long)ctx->data, data_end, info->ip, info->v4, udp, hdr, h, mac) == 0)
		return count(ctx, STCP_V_TX_COOKIE, XDP_TX);
	return count(ctx, has_cookie ? STCP_V_DROP_BAD_COOKIE : STCP_V_DROP_HS_GLOBAL, XDP_DROP);
}

/* A data record whose CID is in neither table. Within the unknown-CID budget, one longer
 * than a RESET goes to user space, which answers it with a stateless RESET (PROTOCOL.md
 * section 5.7): so a client of a server that restarted (or replaced this program) learns
 * at once that its connection is gone. The rest are dropped. */
static __always_inline int unknown_cid(struct xdp_md *ctx, struct stcp_config *cfg, __u64 length)
{
	if (length + STCP_HEADER_LEN > STCP_RESET_RECORD_LEN &&
	    cfg->uk_cost_ns && shared_allows(BUCKET_UNKNOWN_CID, bpf_ktime_get_ns(), cfg->uk_cost_ns, cfg->uk_cap_ns))
		return count(ctx, STCP_V_PASS_UNKNOWN_CID_SAMPLED, deliver(ctx));
	return count(ctx, STCP_V_DROP_UNKNOWN_CID, XDP_DROP);
}

/* A datagram longer than its first record is a batch when it is back-to-back data records
 * of the first record's size (the last may be shorter) naming the first record's CID: a
 * UDP GSO buffer from a sender on this host, which generic XDP sees whole (it runs after
 * the veth has passed the buffer on unsegmented), or a UDP GRO batch on a NIC in generic
 * mode (GRO runs first). The socket takes it as such a batch and user space cuts it
 * there (UDP_GRO), so each record is checked here as if it had come alone: its length
 * field says where it ends, it is a data record, it names the same connection; the first
 * record's checks below (length limits, live CID) then cover every record. At most
 * STCP_BATCH_MAX records (a GSO buffer holds 64; STCP sends at most 64 per buffer).
 * off: the payload's offset from ctx->data. */
static __always_inline int batch_ok(struct xdp_md *ctx, __u32 off, __u32 plen, __u64 length, __u64 cid)
{
	__u32 seg, pos, rest;
	struct stcp_hdr h;
	int i;

	if (length >= plen - STCP_HEADER_LEN)   /* longer than the datagram: no batch */
		return 0;
	seg = (__u32)length + STCP_HEADER_LEN;
	pos = seg;
	for (i = 1; i < STCP_BATCH_MAX; i++) {
		if (pos >= plen)
			return 1;
		rest = plen - pos;
		if (rest > seg)
			rest = seg;
		if (rest < STCP_HEADER_LEN + STCP_AEAD_TAG_LEN)
			return 0;
		/* a helper, not a cursor: the offset is only known at run time */
		if (bpf_xdp_load_bytes(ctx, off + pos, &h, sizeof(h)))
			return 0;
		if (__builtin_bswap64(h.length) != rest - STCP_HEADER_LEN || h.cid != cid || h.seq == 0)
			return 0;
		pos += seg;
	}
	return pos >= plen;
}

int stcp_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = { .pos = data };
	struct l3_info info = {};
	struct stcp_config *cfg;
	struct udphdr *udp;
	struct stcp_hdr *hdr;
	__u32 zero = 0;
	__u64 length, cid;
	__u32 plen, verdict;
	__u16 ulen;
	int proto, rc;

	cfg = stcp_config.lookup(&zero);
	if (!cfg || cfg->port == 0)             /* not configured: nothing is STCP */
		return count(ctx, STCP_V_PASS_NOT_STCP, XDP_PASS);

	proto = parse_ethhdr(&nh, data_end);
	if (proto == bpf_htons(ETH_P_IP))
		rc = parse_ipv4(&nh, data_end, &info);
	else if (proto == bpf_htons(ETH_P_IPV6))
		rc = parse_ipv6(&nh, data_end, &info);
	else if (proto < 0)
		rc = PARSE_UNPARSED;
	else
		rc = PARSE_NOT_UDP;             /* ARP, LLDP, ...: the stack has no UDP in them */
	if (rc == PARSE_NOT_UDP)
		return count(ctx, STCP_V_PASS_NOT_STCP, XDP_PASS);
	if (rc == PARSE_LATER_FRAGMENT)
		return count(ctx, STCP_V_DROP_FRAGMENT, XDP_DROP);
	if (rc != PARSE_UDP)
		return count(ctx, STCP_V_DROP_UNPARSED, XDP_DROP);
	udp = nh.pos;
	if ((void *)(udp + 1) > data_end)
		return count(ctx, STCP_V_DROP_UNPARSED, XDP_DROP);
	if (udp->dest != bpf_htons(cfg->port))
		return count(ctx, STCP_V_PASS_NOT_STCP, XDP_PASS);
	nh.pos = udp + 1;

	/* From here on the datagram is addressed to STCP. */
	if (info.fragment)
		return count(ctx, STCP_V_DROP_FRAGMENT, XDP_DROP);

	/* The UDP length field, not the frame, gives the datagram: Ethernet may pad. */
	ulen = bpf_ntohs(udp->len);
	if (ulen < sizeof(struct udphdr) || (void *)udp + ulen > data_end)
		return count(ctx, STCP_V_DROP_BAD_UDP, XDP_DROP);
	plen = ulen - sizeof(struct udphdr);
	if (plen < STCP_HEADER_LEN)
		return count(ctx, STCP_V_DROP_SHORT_HEADER, XDP_DROP);
	hdr = nh.pos;
	if ((void *)(hdr + 1) > data_end)
		return count(ctx, STCP_V_DROP_SHORT_HEADER, XDP_DROP);

	length = __builtin_bswap64(hdr->length);
	if (length != plen - STCP_HEADER_LEN &&
	    (hdr->seq == 0 || !batch_ok(ctx, (long)hdr - (long)data, plen, length, hdr->cid)))
		return count(ctx, STCP_V_DROP_BAD_LENGTH, XDP_DROP);

	if (hdr->seq == 0)              /* handshake record; 0 is 0 in any byte order */
		return check_hello(ctx, cfg, hdr, data_end, &info, udp, length);

	if (length < STCP_AEAD_TAG_LEN)
		return count(ctx, STCP_V_DROP_TOO_SHORT, XDP_DROP);
	if (length > cfg->max_record_len)
		return count(ctx, STCP_V_DROP_TOO_LONG, XDP_DROP);
	cid = hdr->cid;                 /* wire byte order, as the loader stores keys */
	/* the prefilter counts the CIDs of both tables */
	if (!cid_maybe_live(cid))
		return unknown_cid(ctx, cfg, length);
	if (stcp_cids.lookup(&cid))
		verdict = STCP_V_PASS_DATA;
	else if (stcp_half_open.lookup(&cid))
		verdict = STCP_V_PASS_HALF_OPEN;
	else
		return unknown_cid(ctx, cfg, length);
#ifdef STCP_AFXDP
	/* after the tables: a random-CID flood stays unknown_cid; wrong_worker means a live
	 * connection's record came in on a queue its worker does not own */
	return steer(ctx, cfg, cid, verdict);
#else
	return count(ctx, verdict, deliver(ctx));
#endif
}
