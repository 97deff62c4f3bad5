/* SPDX-License-Identifier: Apache-2.0 */
/* flood: send invalid STCP datagrams as fast as one CPU can, with sendmmsg, to one
 * address (a benchmark namespace's address; bench/xdp_flood.py runs it inside one).
 *
 *   flood DST_IP PORT [--count N] [--seconds S] [--kind unknown-cid|bad-length|hello]
 *                     [--size BYTES] [--batch N] [--source IP] [--rate PPS]
 *
 * --rate paces the batches to an offered load (0, the default: as fast as possible).
 *
 * Bounded by both --count (default 100M) and --seconds (default 10); SIGINT/SIGTERM stop
 * it early. Prints one JSON line: {"sent": N, "seconds": S, "pps": R, ...}.
 *
 * Kinds (all dropped by the XDP program, all work for a user-space server):
 *   unknown-cid  well-formed data records (length ok, seq != 0) with random CIDs
 *   bad-length   records whose length field disagrees with the datagram
 *   hello        client hellos from one source address (rate-limited per source)
 */
#include "flood_common.h"      /* first: it defines _GNU_SOURCE, for sendmmsg */

#include <arpa/inet.h>
#include <stdlib.h>

#define HEADER_LEN 24
#define HELLO_LEN 80
#define MAX_SIZE 1472

static void put_be64(uint8_t *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--) {
		p[i] = v & 0xff;
		v >>= 8;
	}
}

static uint8_t bufs[MAX_BATCH][MAX_SIZE];

/* a fresh random CID per datagram */
static void new_cids(int n, void *rng)
{
	for (int i = 0; i < n; i++)
		put_be64(bufs[i] + 8, xorshift(rng));
}

static void usage(void)
{
	fprintf(stderr, "usage: flood DST_IP PORT [--count N] [--seconds S] "
			"[--kind unknown-cid|bad-length|hello] [--size BYTES] [--batch N] [--source IP] [--rate PPS]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *dst = NULL, *src = NULL, *kind = "unknown-cid";
	long port = 0, count = 100000000L, size = 56, batch = 64;
	double seconds = 10, rate = 0;
	int positional = 0;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--count") && i + 1 < argc) count = atol(argv[++i]);
		else if (!strcmp(argv[i], "--seconds") && i + 1 < argc) seconds = atof(argv[++i]);
		else if (!strcmp(argv[i], "--kind") && i + 1 < argc) kind = argv[++i];
		else if (!strcmp(argv[i], "--size") && i + 1 < argc) size = atol(argv[++i]);
		else if (!strcmp(argv[i], "--batch") && i + 1 < argc) batch = atol(argv[++i]);
		else if (!strcmp(argv[i], "--source") && i + 1 < argc) src = argv[++i];
		else if (!strcmp(argv[i], "--rate") && i + 1 < argc) rate = atof(argv[++i]);
		else if (argv[i][0] == '-') usage();
		else if (positional == 0) { dst = argv[i]; positional++; }
		else if (positional == 1) { port = atol(argv[i]); positional++; }
		else usage();
	}
	if (!dst || port <= 0 || port > 65535 || count <= 0 || seconds <= 0 || seconds > 3600 || rate < 0)
		usage();
	if (batch < 1 || batch > MAX_BATCH) batch = MAX_BATCH;
	if (!strcmp(kind, "hello")) size = HEADER_LEN + HELLO_LEN;
	if (size < HEADER_LEN + 16 || size > MAX_SIZE) {
		fprintf(stderr, "flood: --size must be %d..%d\n", HEADER_LEN + 16, MAX_SIZE);
		return 2;
	}

	struct sockaddr_storage ss = {0};
	socklen_t sslen;
	int family;
	struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
	struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
	if (inet_pton(AF_INET, dst, &s4->sin_addr) == 1) {
		family = AF_INET; s4->sin_family = AF_INET; s4->sin_port = htons(port); sslen = sizeof(*s4);
	} else if (inet_pton(AF_INET6, dst, &s6->sin6_addr) == 1) {
		family = AF_INET6; s6->sin6_family = AF_INET6; s6->sin6_port = htons(port); sslen = sizeof(*s6);
	} else {
		fprintf(stderr, "flood: bad address %s\n", dst);
		return 2;
	}
	int fd = socket(family, SOCK_DGRAM, 0);
	if (fd < 0) { perror("flood: socket"); return 1; }
	if (src) {
		struct sockaddr_storage bs = {0};
		struct sockaddr_in *b4 = (struct sockaddr_in *)&bs;
		struct sockaddr_in6 *b6 = (struct sockaddr_in6 *)&bs;
		socklen_t blen;
		if (family == AF_INET && inet_pton(AF_INET, src, &b4->sin_addr) == 1) {
			b4->sin_family = AF_INET; blen = sizeof(*b4);
		} else if (family == AF_INET6 && inet_pton(AF_INET6, src, &b6->sin6_addr) == 1) {
			b6->sin6_family = AF_INET6; blen = sizeof(*b6);
		} else { fprintf(stderr, "flood: bad source %s\n", src); return 2; }
		if (bind(fd, (struct sockaddr *)&bs, blen) < 0) { perror("flood: bind"); return 1; }
	}
	if (connect(fd, (struct sockaddr *)&ss, sslen) < 0) { perror("flood: connect"); return 1; }

	struct mmsghdr msgs[MAX_BATCH];
	struct iovec iov[MAX_BATCH];
	uint64_t rng = rng_seed();
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < batch; i++) {
		uint8_t *p = bufs[i];
		memset(p, 0xA5, size);
		uint64_t len = size - HEADER_LEN;
		if (!strcmp(kind, "bad-length")) len += 1 + (i % 7);
		else if (!strcmp(kind, "hello")) { len = HELLO_LEN; }
		else if (strcmp(kind, "unknown-cid")) { fprintf(stderr, "flood: unknown kind %s\n", kind); return 2; }
		put_be64(p, len);
		put_be64(p + 8, !strcmp(kind, "hello") ? 0 : xorshift(&rng));
		put_be64(p + 16, !strcmp(kind, "hello") ? 0 : 1 + (uint64_t)i);
		if (!strcmp(kind, "hello")) { memset(p + HEADER_LEN, 0, HELLO_LEN); p[HEADER_LEN] = 1; p[HEADER_LEN + 1] = 1; }
		iov[i].iov_base = p;
		iov[i].iov_len = size;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}

	struct flood_result r = flood(fd, msgs, batch, count, seconds, rate, strcmp(kind, "hello") ? new_cids : NULL,
				      &rng, "flood");
	printf("{\"sent\": %ld, \"seconds\": %.6f, \"pps\": %.1f, \"errors\": %ld, \"kind\": \"%s\", "
	       "\"size\": %ld, \"batch\": %ld, \"rate\": %.0f}\n", r.sent, r.seconds,
	       r.seconds > 0 ? r.sent / r.seconds : 0.0, r.errors, kind, size, batch, rate);
	close(fd);
	return 0;
}
