/* SPDX-License-Identifier: Apache-2.0 */
/* STCP SO_REUSEPORT steering: pick the worker socket of a UDP reuseport group by the
 * worker bits of the record's connection ID (docs/PROTOCOL.md section 3.1.1).
 *
 * A BPF_PROG_TYPE_SK_REUSEPORT program, compiled by bcc at load time and attached to the
 * group with SO_ATTACH_REUSEPORT_EBPF (stcp/datapath/reuseport.py). The kernel runs it
 * for every datagram to the group's address and port, after the UDP header checks and
 * before any socket is chosen; ctx->data points at the UDP header.
 *
 * bcc 0.26 cannot declare a REUSEPORT_SOCKARRAY, so the loader creates it through the
 * bpf syscall and passes its fd as -DSTCP_RP_SOCKARRAY_FD; bpf_pseudo_fd() emits the
 * map-fd load that the kernel resolves to the map when the program is loaded.
 *
 *   client hello (cid 0, seq 0)  -> SK_PASS, no selection: the kernel hashes the 4-tuple
 *                                   over the group's sockets (the live workers)
 *   record with another cid/seq  -> the socket at key = top byte of the CID; none there
 *                                   (worker dead or restarting): SK_PASS by the kernel's
 *                                   hash, so a live worker answers it with a stateless
 *                                   RESET and the client learns at once
 *   not a 24-byte STCP header    -> SK_PASS by the kernel's hash (the worker drops it)
 *
 * Every path ends in count(), which bumps the per-CPU (packets, bytes) counter of its
 * verdict and returns the action.
 */
#include <uapi/linux/bpf.h>
#include <linux/types.h>
#include <linux/in.h>
#include <linux/udp.h>

#include "stcp_wire.h"

#ifndef STCP_RP_SOCKARRAY_FD
#error "the loader passes the REUSEPORT_SOCKARRAY fd as -DSTCP_RP_SOCKARRAY_FD"
#endif

#define STCP_ENOENT 2           /* errno of bpf_sk_select_reuseport for an empty key */

/* Verdicts, mirrored by ReuseportVerdict in stcp/datapath/reuseport.py
 * (tests/test_constants.py checks both sides). Append only, never renumber. */
enum stcp_rp_verdict {
	STCP_RP_PASS_NOT_STCP     = 0,  /* not UDP, or payload under the 24-byte header */
	STCP_RP_PASS_HELLO        = 1,  /* cid 0 and seq 0: the kernel's hash picks */
	STCP_RP_PASS_WORKER       = 2,  /* record sent to its CID's worker socket */
	STCP_RP_PASS_ORPHAN       = 3,  /* no socket at the CID's worker key: the kernel's hash */
	STCP_RP_DROP_WRONG_GROUP  = 4,  /* the key's socket is in another reuseport group */
	STCP_RP_MAX               = 5,
};

BPF_PERCPU_ARRAY(stcp_rp_counters, struct stcp_counter, STCP_RP_MAX);

/* cid and seq of the record header (struct stcp_hdr after its length field) */
struct stcp_rp_ids {
	__be64 cid;
	__be64 seq;
};

static __always_inline int count(__u32 verdict, __u32 len, int action)
{
	struct stcp_counter *c = stcp_rp_counters.lookup(&verdict);

	if (c) {
		c->packets++;
		c->bytes += len;
	}
	return action;
}

int stcp_reuseport(struct sk_reuseport_md *ctx)
{
	struct stcp_rp_ids ids;
	__u32 len = ctx->len;               /* UDP header + payload */
	__u32 worker;
	long err;

	if (ctx->ip_protocol != IPPROTO_UDP || len < sizeof(struct udphdr) + STCP_HEADER_LEN)
		return count(STCP_RP_PASS_NOT_STCP, len, SK_PASS);
	/* skb_load_bytes rather than direct access: the header may lie past the skb's
	 * linear part, where data_end stops */
	if (bpf_skb_load_bytes(ctx, sizeof(struct udphdr) + 8, &ids, sizeof(ids)) < 0)
		return count(STCP_RP_PASS_NOT_STCP, len, SK_PASS);
	if (ids.cid == 0 && ids.seq == 0)
		return count(STCP_RP_PASS_HELLO, len, SK_PASS);

	worker = __builtin_bswap64(ids.cid) >> STCP_CID_WORKER_SHIFT;
	err = bpf_sk_select_reuseport(ctx, (void *)bpf_pseudo_fd(1, STCP_RP_SOCKARRAY_FD), &worker, 0);
	if (err == 0)
		return count(STCP_RP_PASS_WORKER, len, SK_PASS);
	/* Its owner is gone, and so is the connection: any live worker may say so (it checks
	 * that the key is still empty before it sends the RESET). */
	if (err == -STCP_ENOENT)
		return count(STCP_RP_PASS_ORPHAN, len, SK_PASS);
	return count(STCP_RP_DROP_WRONG_GROUP, len, SK_DROP);
}
