/* SPDX-License-Identifier: Apache-2.0 */
/* STCP wire constants for the kernel datapath.
 *
 * Mirrors stcp/wire.py (the record layer) and stcp/datapath/verdicts.py (the verdict
 * enum). tests/test_constants.py parses this file and fails if any value here differs
 * from the Python side, so change both together.
 *
 * Every STCP_* #define below with a plain integer value is a shared constant: the name
 * without the STCP_ prefix is the constant's name in stcp/wire.py.
 */
#ifndef STCP_WIRE_H
#define STCP_WIRE_H

/* --- record layer (stcp/wire.py) ---------------------------------------- */
#define STCP_HEADER_LEN            24    /* length:u64 | cid:u64 | seq:u64 */
#define STCP_AEAD_TAG_LEN          16
#define STCP_MAX_UDP_PAYLOAD       65507
#define STCP_DEFAULT_MAX_DATAGRAM  1452
#define STCP_EPOCH_SHIFT           48
#define STCP_HANDSHAKE_SEQ         0
#define STCP_HANDSHAKE_PAYLOAD_LEN 112   /* version 2 */
#define STCP_HANDSHAKE_RECORD_LEN  136
#define STCP_V1_HANDSHAKE_PAYLOAD_LEN 80 /* a version 1 hello, passed on to be rejected */
#define STCP_HS_CLIENT_HELLO       1
#define STCP_HS_SERVER_HELLO       2
#define STCP_HS_REJECT             3
/* A steering server's CID: worker number in the top STCP_CID_WORKER_BITS, then the server
 * id and random bits (docs/PROTOCOL.md section 3.1.1); the programs read only the worker. */
#define STCP_CID_WORKER_BITS       8
#define STCP_CID_WORKER_SHIFT      56    /* 64 - STCP_CID_WORKER_BITS */

/* --- verdicts (stcp/datapath/verdicts.py) --------------------------------
 * One per-CPU counter (packets, bytes) per verdict. Values are indexes into the
 * stcp_counters array; append new verdicts before STCP_V_MAX, never renumber. */
enum stcp_verdict {
	STCP_V_PASS_NOT_STCP      = 0,  /* shown not UDP to the STCP port (ARP, ICMP, TCP, ...) */
	STCP_V_PASS_HANDSHAKE     = 1,  /* well-formed client hello within its rate */
	STCP_V_PASS_DATA          = 2,  /* well-formed data record for a live CID */
	STCP_V_DROP_SHORT_HEADER  = 3,  /* UDP payload shorter than the 24-byte header */
	STCP_V_DROP_BAD_LENGTH    = 4,  /* length field != UDP payload length - 24 */
	STCP_V_DROP_TOO_SHORT     = 5,  /* data record payload below the AEAD tag size */
	STCP_V_DROP_TOO_LONG      = 6,  /* data record payload above the configured max */
	STCP_V_DROP_FRAGMENT      = 7,  /* first fragment of an STCP datagram, or a later
	                                 * fragment of any UDP datagram (it has no port) */
	STCP_V_DROP_UNKNOWN_CID   = 8,  /* data record whose CID is not in stcp_cids */
	STCP_V_DROP_HS_RATE       = 9,  /* client hello over its source prefix's bucket */
	STCP_V_DROP_BAD_HANDSHAKE = 10, /* seq 0 but not a v2 (112) or v1 (80) client hello, cid 0 */
	STCP_V_DROP_BAD_UDP       = 11, /* UDP length field < 8 or past the end of the frame */
	STCP_V_DROP_WRONG_WORKER  = 12, /* afxdp: live CID of another worker on this RX queue */
	STCP_V_DROP_UNPARSED      = 13, /* headers the program cannot walk to the UDP port:
	                                 * truncated or malformed, a third VLAN tag, more IPv6
	                                 * extension headers than it walks */
	STCP_V_DROP_HS_GLOBAL     = 14, /* client hello over the global hello budget */
	STCP_V_MAX                = 15,
};

/* --- map sizes (the loader may override them through -D cflags) --------- */
#ifndef STCP_MAX_CIDS              /* capacity of the live-connection table */
#define STCP_MAX_CIDS 65536
#endif
#ifndef STCP_HS_SOURCES            /* capacity of the LRU of per-source-prefix hello buckets */
#define STCP_HS_SOURCES 65536
#endif
/* Words of the CID prefilter, a power of two. Each u64 word packs 8 u8 counters, one per
 * filter slot; a slot counts the live CIDs that fold onto it (saturating at 255, then
 * never decremented). A record whose slot is 0 cannot be live and is dropped without
 * touching the hash table: 64 KB stay in cache where the hash table's bucket array
 * (1 MB at 65536 entries) does not, and a random-CID flood costs a cache miss per
 * packet there (measured ~150 ns on the dev VM, against ~25 ns with the filter). */
#ifndef STCP_CID_FILTER_WORDS
#define STCP_CID_FILTER_WORDS 8192
#endif
#define STCP_CID_FILTER_SLOTS (STCP_CID_FILTER_WORDS * 8)

/* Layout version of the maps below; the loader refuses to reuse another version.
 * 3: stcp_config.nworkers (was reserved) and verdict STCP_V_DROP_WRONG_WORKER.
 * 4: hello buckets per source prefix and a global one (stcp_config.hs_prefix4/6,
 *    hs_global_*; stcp_hs_bucket values are one u64), verdicts DROP_UNPARSED and
 *    DROP_HS_GLOBAL. */
#define STCP_MAP_ABI 4

struct stcp_counter {
	__u64 packets;
	__u64 bytes;
};

/* Runtime configuration, element 0 of the stcp_config array; written by the loader
 * before the program is attached. port 0 means "not configured": everything passes.
 * Hello rate limits are token buckets kept as a theoretical arrival time (see
 * bucket_take() in stcp_xdp.c): a hello costs *_cost_ns = 1e9 / rate of credit, a full
 * bucket holds *_cap_ns = cost * burst. */
struct stcp_config {
	__u32 abi;               /* STCP_MAP_ABI */
	__u32 port;              /* UDP destination port of STCP, host order */
	__u32 max_record_len;    /* largest accepted data record payload */
	__u32 hs_rate;           /* client hellos per second per source prefix */
	__u32 hs_burst;          /* token bucket depth, in hellos */
	__u32 nworkers;          /* afxdp: workers over the RX queues (queue q -> worker
	                          * q % nworkers); 0: no CID steering */
	__u64 hs_cost_ns;        /* 1e9 / hs_rate: credit one hello costs */
	__u64 hs_cap_ns;         /* hs_cost_ns * hs_burst: a full bucket */
	__u32 hs_prefix4;        /* leading bits of an IPv4 source that name its bucket (32) */
	__u32 hs_prefix6;        /* leading bits of an IPv6 source that name its bucket (64) */
	__u32 hs_global_rate;    /* client hellos per second from all sources together */
	__u32 hs_global_burst;   /* depth of that bucket, in hellos */
	__u64 hs_global_cost_ns; /* 1e9 / hs_global_rate; 0: no global budget */
	__u64 hs_global_cap_ns;  /* hs_global_cost_ns * hs_global_burst */
};

/* Key of a per-source hello bucket: the source address masked to its prefix
 * (hs_prefix4 / hs_prefix6), IPv4 as ::ffff:a.b.c.d. Network byte order. */
struct stcp_src {
	__be32 addr[4];
};

struct stcp_hdr {
	__be64 length;
	__be64 cid;   /* compared as raw wire bytes: the loader stores keys big-endian */
	__be64 seq;
};

#endif /* STCP_WIRE_H */
