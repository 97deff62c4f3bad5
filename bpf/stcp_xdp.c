/* SPDX-License-Identifier: Apache-2.0 */
/* STCP XDP datapath: validate STCP records at the earliest point and drop the bad ones.
 *
 * Compiled by bcc at load time (stcp/datapath/xdp.py). The port and limits live in the
 * one-element stcp_config array (struct stcp_config, written by the loader before it
 * attaches); map sizes come in as -D cflags. Uses UAPI headers only: the installed
 * kernel headers may be older than the running kernel.
 *
 * Every path ends in count(), which bumps the per-CPU (packets, bytes) counter of its
 * verdict and returns XDP_PASS or XDP_DROP. Style after xdp-tutorial: a cursor, small
 * parse helpers, a bounds check before every read.
 */
#include <uapi/linux/bpf.h>
#include <linux/types.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/udp.h>

#include "stcp_wire.h"

#define VLAN_HLEN 4
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF
#define IP6_OFFSET 0xFFF8
#define IPV6_EXT_MAX 6          /* extension headers walked before giving up */


BPF_PERCPU_ARRAY(stcp_counters, struct stcp_counter, STCP_V_MAX);
BPF_HASH(stcp_cids, __u64, __u8, STCP_MAX_CIDS);
BPF_TABLE("lru_hash", struct stcp_src, struct stcp_bucket, stcp_hs_bucket, STCP_HS_SOURCES);
BPF_ARRAY(stcp_config, struct stcp_config, 1);
BPF_ARRAY(stcp_cid_filter, __u64, STCP_CID_FILTER_WORDS);

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

/* What the L3 parsers found: where UDP starts, whether this is a fragment, who sent it. */
struct l3_info {
	struct udphdr *udp;
	int fragment;
	struct stcp_src src;
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
static __always_inline int steer(struct xdp_md *ctx, struct stcp_config *cfg, __u64 raw_cid)
{
	__u32 nworkers = cfg->nworkers;
	__u32 worker, owner;

	if (nworkers == 0)              /* not configured: every queue takes every record */
		return count(ctx, STCP_V_PASS_DATA, deliver(ctx));
	/* raw_cid is in wire (big-endian) order; its top bits are the worker */
	worker = (__u32)(__builtin_bswap64(raw_cid) >> STCP_CID_WORKER_SHIFT);
	owner = ctx->rx_queue_index % nworkers;
	if (worker != owner)
		return count(ctx, STCP_V_DROP_WRONG_WORKER, XDP_DROP);
	return count(ctx, STCP_V_PASS_DATA, deliver(ctx));
}
#endif

/* Ethernet plus at most one 802.1Q / 802.1ad tag; returns the inner EtherType (network
 * order) or -1 when the frame is too short. */
static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end)
{
	struct ethhdr *eth = nh->pos;
	struct vlan_hdr *vlh;
	__be16 proto;

	if ((void *)(eth + 1) > data_end)
		return -1;
	nh->pos = eth + 1;
	proto = eth->h_proto;
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		vlh = nh->pos;
		if ((void *)(vlh + 1) > data_end)
			return -1;
		nh->pos = vlh + 1;
		proto = vlh->h_vlan_encapsulated_proto;
	}
	return proto;
}

/* Returns 0 with info->udp set when this is (the first fragment of) a UDP datagram, -1
 * otherwise (not UDP, truncated, or a later fragment, which carries no UDP header). */
static __always_inline int parse_ipv4(struct hdr_cursor *nh, void *data_end, struct l3_info *info)
{
	struct iphdr *iph = nh->pos;
	struct udphdr *udp;
	int hdrsize;
	__u16 frag;

	if ((void *)(iph + 1) > data_end)
		return -1;
	hdrsize = iph->ihl * 4;
	if (hdrsize < (int)sizeof(*iph))
		return -1;
	if (nh->pos + hdrsize > data_end)
		return -1;
	if (iph->protocol != IPPROTO_UDP)
		return -1;
	frag = bpf_ntohs(iph->frag_off);
	if (frag & IP_OFFSET)
		return -1;
	info->fragment = (frag & IP_MF) != 0;
	udp = nh->pos + hdrsize;
	if ((void *)(udp + 1) > data_end)
		return -1;
	nh->pos = udp + 1;
	info->udp = udp;
	/* ::ffff:a.b.c.d */
	info->src.addr[10] = 0xff;
	info->src.addr[11] = 0xff;
	__builtin_memcpy(&info->src.addr[12], &iph->saddr, 4);
	return 0;
}

static __always_inline int parse_ipv6(struct hdr_cursor *nh, void *data_end, struct l3_info *info)
{
	struct ipv6hdr *ip6h = nh->pos;
	struct udphdr *udp;
	__u8 nexthdr;
	int i;

	if ((void *)(ip6h + 1) > data_end)
		return -1;
	nh->pos = ip6h + 1;
	nexthdr = ip6h->nexthdr;

#pragma unroll
	for (i = 0; i < IPV6_EXT_MAX; i++) {
		if (nexthdr == IPPROTO_UDP)
			break;
		if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
		    nexthdr == IPPROTO_DSTOPTS) {
			struct ipv6_ext *ext = nh->pos;

			if ((void *)(ext + 1) > data_end)
				return -1;
			nexthdr = ext->nexthdr;
			nh->pos += (ext->hdrlen + 1) * 8;
		} else if (nexthdr == IPPROTO_FRAGMENT) {
			struct ipv6_frag *fh = nh->pos;

			if ((void *)(fh + 1) > data_end)
				return -1;
			if (bpf_ntohs(fh->frag_off) & IP6_OFFSET)
				return -1;      /* later fragment: no UDP header to look at */
			info->fragment = 1;
			nexthdr = fh->nexthdr;
			nh->pos = fh + 1;
		} else {
			return -1;
		}
	}
	if (nexthdr != IPPROTO_UDP)
		return -1;
	udp = nh->pos;
	if ((void *)(udp + 1) > data_end)
		return -1;
	nh->pos = udp + 1;
	info->udp = udp;
	__builtin_memcpy(info->src.addr, &ip6h->saddr, 16);
	return 0;
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

/* Token bucket per source address; 1 = within rate. Updates race benignly across CPUs
 * (a few extra hellos may pass under a multi-queue flood from one source). */
static __always_inline int hello_allowed(struct stcp_config *cfg, struct stcp_src *src)
{
	__u64 now = bpf_ktime_get_ns();
	struct stcp_bucket *b = stcp_hs_bucket.lookup(src);
	__u64 credit;

	if (!b) {
		struct stcp_bucket fresh = { .last_ns = now };

		if (cfg->hs_cap_ns < cfg->hs_cost_ns)
			return 0;       /* burst 0: no hello ever passes */
		fresh.credit_ns = cfg->hs_cap_ns - cfg->hs_cost_ns;

		stcp_hs_bucket.update(src, &fresh);
		return 1;
	}
	credit = b->credit_ns + (now - b->last_ns);
	if (credit > cfg->hs_cap_ns)
		credit = cfg->hs_cap_ns;
	b->last_ns = now;
	if (credit < cfg->hs_cost_ns) {
		b->credit_ns = credit;
		return 0;
	}
	b->credit_ns = credit - cfg->hs_cost_ns;
	return 1;
}

int stcp_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = { .pos = data };
	struct l3_info info = {};
	struct stcp_config *cfg;
	struct stcp_hdr *hdr;
	__u32 zero = 0;
	__u64 length, cid;
	__u32 plen;
	__u16 ulen;
	__u8 *type;
	int proto, rc;

	proto = parse_ethhdr(&nh, data_end);
	if (proto == bpf_htons(ETH_P_IP))
		rc = parse_ipv4(&nh, data_end, &info);
	else if (proto == bpf_htons(ETH_P_IPV6))
		rc = parse_ipv6(&nh, data_end, &info);
	else
		rc = -1;
	if (rc < 0 || !info.udp)
		return count(ctx, STCP_V_PASS_NOT_STCP, XDP_PASS);
	cfg = stcp_config.lookup(&zero);
	if (!cfg || cfg->port == 0 || info.udp->dest != bpf_htons(cfg->port))
		return count(ctx, STCP_V_PASS_NOT_STCP, XDP_PASS);

	/* From here on the datagram is addressed to STCP. */
	if (info.fragment)
		return count(ctx, STCP_V_DROP_FRAGMENT, XDP_DROP);

	/* The UDP length field, not the frame, gives the datagram: Ethernet may pad. */
	ulen = bpf_ntohs(info.udp->len);
	if (ulen < sizeof(struct udphdr) || (void *)info.udp + ulen > data_end)
		return count(ctx, STCP_V_DROP_BAD_UDP, XDP_DROP);
	plen = ulen - sizeof(struct udphdr);
	if (plen < STCP_HEADER_LEN)
		return count(ctx, STCP_V_DROP_SHORT_HEADER, XDP_DROP);
	hdr = nh.pos;
	if ((void *)(hdr + 1) > data_end)
		return count(ctx, STCP_V_DROP_SHORT_HEADER, XDP_DROP);

	length = __builtin_bswap64(hdr->length);
	if (length != plen - STCP_HEADER_LEN)
		return count(ctx, STCP_V_DROP_BAD_LENGTH, XDP_DROP);

	if (hdr->seq == 0) {            /* handshake record; 0 is 0 in any byte order */
		/* a v2 hello, or a v1 one that user space answers with a v1-layout REJECT */
		if ((length != STCP_HANDSHAKE_PAYLOAD_LEN && length != STCP_V1_HANDSHAKE_PAYLOAD_LEN) ||
		    hdr->cid != 0)
			return count(ctx, STCP_V_DROP_BAD_HANDSHAKE, XDP_DROP);
		type = (__u8 *)(hdr + 1);
		if ((void *)(type + 1) > data_end)
			return count(ctx, STCP_V_DROP_BAD_HANDSHAKE, XDP_DROP);
		if (*type != STCP_HS_CLIENT_HELLO)
			return count(ctx, STCP_V_DROP_BAD_HANDSHAKE, XDP_DROP);
		if (!hello_allowed(cfg, &info.src))
			return count(ctx, STCP_V_DROP_HS_RATE, XDP_DROP);
		/* afxdp: to the arrival queue's socket; that queue's worker will own the
		 * connection and name itself in the CID it picks */
		return count(ctx, STCP_V_PASS_HANDSHAKE, deliver(ctx));
	}

	if (length < STCP_AEAD_TAG_LEN)
		return count(ctx, STCP_V_DROP_TOO_SHORT, XDP_DROP);
	if (length > cfg->max_record_len)
		return count(ctx, STCP_V_DROP_TOO_LONG, XDP_DROP);
	cid = hdr->cid;                 /* wire byte order, as the loader stores keys */
	if (!cid_maybe_live(cid) || !stcp_cids.lookup(&cid))
		return count(ctx, STCP_V_DROP_UNKNOWN_CID, XDP_DROP);
#ifdef STCP_AFXDP
	/* after the table: a random-CID flood stays unknown_cid; wrong_worker means a live
	 * connection's record came in on a queue its worker does not own */
	return steer(ctx, cfg, cid);
#else
	return count(ctx, STCP_V_PASS_DATA, deliver(ctx));
#endif
}

