/* SPDX-License-Identifier: Apache-2.0 */
/* hello_flood: version 2 CLIENT_HELLOs from spoofed IPv4 sources, as fast as one CPU can send
 * them, as raw Ethernet frames on an AF_PACKET socket (bench/hello_flood.py runs it inside
 * a benchmark namespace, toward the other end of a veth pair).
 *
 *   hello_flood IFACE DST_MAC SRC_MAC DST_IP PORT PREFIX/LEN [--seconds S] [--count N]
 *               [--batch N] [--rate PPS]
 *
 * Every frame is a well-formed hello (PROTOCOL.md section 4.1) with no cookie, from a
 * random address of PREFIX/LEN and a random source port, with a random client CID and
 * key E: each looks like a new client, and none can complete a handshake (the replies go
 * to addresses the sender does not hold). IPv4 header checksum right, UDP checksum 0
 * (none), so every receiver takes the frames as they are.
 *
 * Bounded by --count (default 1e9) and --seconds (default 10); SIGINT/SIGTERM stop it.
 * Prints one JSON line: {"sent": N, "seconds": S, "pps": R, ...}.
 */
#include "flood_common.h"      /* first: it defines _GNU_SOURCE, for sendmmsg */

#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdlib.h>

#define RECORD_LEN 136              /* header 24 + v2 hello payload 112 */
#define FRAME_LEN (14 + 20 + 8 + RECORD_LEN)

static int parse_mac(const char *s, uint8_t *mac)
{
	return sscanf(s, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4], &mac[5]) == 6;
}

static uint16_t ip_csum(const uint8_t *p)
{
	uint32_t s = 0;
	for (int i = 0; i < 20; i += 2)
		s += (uint32_t)p[i] << 8 | p[i + 1];
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (uint16_t)~s;
}

static void usage(void)
{
	fprintf(stderr, "usage: hello_flood IFACE DST_MAC SRC_MAC DST_IP PORT PREFIX/LEN [--seconds S] [--count N] "
			"[--batch N] [--rate PPS]\n");
	exit(2);
}

/* A fresh source address, port, client CID and key in frame p. */
static void randomize(uint8_t *p, uint32_t net, uint32_t hostmask, uint64_t *rng)
{
	uint64_t r = xorshift(rng);
	uint32_t src = net | ((uint32_t)r & hostmask);
	uint8_t *ip = p + 14, *udp = ip + 20, *hello = udp + 8 + 24;

	if ((src & hostmask) == 0 || (src & hostmask) == hostmask)   /* not the network or broadcast address */
		src ^= 1;
	src = htonl(src);
	memcpy(ip + 12, &src, 4);
	ip[10] = ip[11] = 0;
	uint16_t c = htons(ip_csum(ip));
	memcpy(ip + 10, &c, 2);
	uint16_t sport = htons(1024 + (uint16_t)((r >> 32) % 64000));
	memcpy(udp, &sport, 2);
	uint64_t cid = xorshift(rng) | 1;           /* client CID: never 0 */
	memcpy(hello + 8, &cid, 8);
	for (int i = 0; i < 4; i++) {               /* E */
		uint64_t e = xorshift(rng);
		memcpy(hello + 16 + 8 * i, &e, 8);
	}
}

static uint8_t frames[MAX_BATCH][FRAME_LEN];

struct sources {
	uint32_t net, hostmask;
	uint64_t rng;
};

/* every frame a new client */
static void new_clients(int n, void *arg)
{
	struct sources *s = arg;
	for (int i = 0; i < n; i++)
		randomize(frames[i], s->net, s->hostmask, &s->rng);
}

int main(int argc, char **argv)
{
	const char *pos[6];
	int npos = 0;
	long count = 1000000000L, batch = 64;
	double seconds = 10, rate = 0;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--seconds") && i + 1 < argc) seconds = atof(argv[++i]);
		else if (!strcmp(argv[i], "--count") && i + 1 < argc) count = atol(argv[++i]);
		else if (!strcmp(argv[i], "--batch") && i + 1 < argc) batch = atol(argv[++i]);
		else if (!strcmp(argv[i], "--rate") && i + 1 < argc) rate = atof(argv[++i]);
		else if (argv[i][0] == '-' || npos == 6) usage();
		else pos[npos++] = argv[i];
	}
	if (npos != 6 || seconds <= 0 || seconds > 3600 || count <= 0 || rate < 0)
		usage();
	if (batch < 1 || batch > MAX_BATCH) batch = MAX_BATCH;

	uint8_t dmac[6], smac[6];
	struct in_addr dst, net;
	char prefix[64];
	snprintf(prefix, sizeof(prefix), "%s", pos[5]);
	char *slash = strchr(prefix, '/');
	long port = atol(pos[4]), plen = slash ? atol(slash + 1) : -1;
	if (slash)
		*slash = 0;
	if (!parse_mac(pos[1], dmac) || !parse_mac(pos[2], smac) || inet_pton(AF_INET, pos[3], &dst) != 1 ||
	    port <= 0 || port > 65535 || inet_pton(AF_INET, prefix, &net) != 1 || plen < 8 || plen > 30) {
		fprintf(stderr, "hello_flood: bad MAC, address, port or prefix (PREFIX/LEN with LEN 8..30)\n");
		return 2;
	}
	uint32_t hostmask = (1u << (32 - plen)) - 1, netv = ntohl(net.s_addr) & ~hostmask;

	int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
	if (fd < 0) { perror("hello_flood: socket"); return 1; }
	int one = 1;
	setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one));   /* best effort */
	struct sockaddr_ll sll = {0};
	sll.sll_family = AF_PACKET;
	sll.sll_protocol = htons(ETH_P_IP);
	sll.sll_ifindex = if_nametoindex(pos[0]);
	if (!sll.sll_ifindex) { fprintf(stderr, "hello_flood: no interface %s\n", pos[0]); return 2; }
	if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0) { perror("hello_flood: bind"); return 1; }

	struct mmsghdr msgs[MAX_BATCH];
	struct iovec iov[MAX_BATCH];
	struct sources src = { netv, hostmask, rng_seed() };
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < batch; i++) {
		uint8_t *p = frames[i], *ip = p + 14, *udp = ip + 20, *rec = udp + 8;
		memset(p, 0, FRAME_LEN);
		memcpy(p, dmac, 6);
		memcpy(p + 6, smac, 6);
		p[12] = 0x08;                       /* IPv4 */
		ip[0] = 0x45;
		uint16_t tot = htons(20 + 8 + RECORD_LEN), dport = htons((uint16_t)port), ulen = htons(8 + RECORD_LEN);
		memcpy(ip + 2, &tot, 2);
		ip[8] = 64;
		ip[9] = 17;                         /* UDP */
		memcpy(ip + 16, &dst, 4);
		memcpy(udp + 2, &dport, 2);
		memcpy(udp + 4, &ulen, 2);
		rec[7] = 112;                       /* length (u64 BE); cid 0, seq 0 */
		rec[24] = 1;                        /* CLIENT_HELLO */
		rec[25] = 2;                        /* version 2 */
		rec[26] = 1;                        /* AES-256-GCM */
		randomize(p, netv, hostmask, &src.rng);
		iov[i].iov_base = p;
		iov[i].iov_len = FRAME_LEN;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}

	struct flood_result r = flood(fd, msgs, batch, count, seconds, rate, new_clients, &src, "hello_flood");
	printf("{\"sent\": %ld, \"seconds\": %.6f, \"pps\": %.1f, \"errors\": %ld, \"batch\": %ld, \"rate\": %.0f, "
	       "\"prefix\": \"%s/%ld\"}\n", r.sent, r.seconds, r.seconds > 0 ? r.sent / r.seconds : 0.0, r.errors,
	       batch, rate, prefix, plen);
	close(fd);
	return 0;
}
