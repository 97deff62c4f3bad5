/* SPDX-License-Identifier: Apache-2.0 */
/* What bench/flood.c and bench/hello_flood.c share: the clock, the random numbers, and the
 * send loop (sendmmsg of a batch, bounded by a count and a deadline, paced to an offered
 * rate, stopped early by SIGINT/SIGTERM). Each program builds its own batch and says how
 * to refresh it before every call. */
#ifndef FLOOD_COMMON_H
#define FLOOD_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 256

static volatile sig_atomic_t stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t xorshift(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static uint64_t rng_seed(void)
{
	return 0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid() ^ (uint64_t)(now() * 1e9);
}

struct flood_result {
	long sent, errors;      /* datagrams sent; calls that found the socket's buffer full */
	double seconds;
};

/* Send msgs[0..batch) over fd again and again until count are sent, `seconds` have passed
 * or a signal came; refresh(n, arg) first rewrites what must differ in the first n (NULL:
 * nothing). rate > 0 paces the batches to that many datagrams a second. A send error other
 * than a full buffer (or a refused port, for a connected UDP socket) ends the loop. */
static struct flood_result flood(int fd, struct mmsghdr *msgs, long batch, long count, double seconds,
				 double rate, void (*refresh)(int n, void *arg), void *arg, const char *prog)
{
	struct flood_result res = {0, 0, 0};
	double t0 = now(), t = t0, deadline = t0 + seconds;

	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	while (!stop && res.sent < count) {
		int n = batch;
		if (count - res.sent < n) n = (int)(count - res.sent);
		if (refresh)
			refresh(n, arg);
		int r = sendmmsg(fd, msgs, n, 0);
		if (r < 0) {
			if (errno == EINTR) continue;
			if (errno == ENOBUFS || errno == EAGAIN || errno == ECONNREFUSED) { res.errors++; continue; }
			fprintf(stderr, "%s: sendmmsg: %s\n", prog, strerror(errno));
			break;
		}
		res.sent += r;
		t = now();
		if (t >= deadline) break;
		if (rate > 0) {                        /* pace: wait until this many are due */
			double due = t0 + res.sent / rate;
			while (t < due && t < deadline && !stop) {
				double gap = due - t;
				if (gap > 0.0002) {
					struct timespec ts = { 0, (long)((gap - 0.0001) * 1e9) };
					nanosleep(&ts, NULL);
				}
				t = now();
			}
		}
	}
	res.seconds = now() - t0;
	return res;
}

#endif
