/* SPDX-License-Identifier: Apache-2.0 */
/* Another XDP program for tests/test_xdp_coexist.py: counts IPv4 ICMP frames and passes
 * everything, as a monitoring or filtering program sharing the interface with STCP would.
 * Built with clang and loaded with xdp-loader, which puts it behind libxdp's dispatcher. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} icmp_count SEC(".maps");

SEC("xdp")
int xdp_icmp_count(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	__u32 zero = 0;
	__u64 *n;

	if ((void *)(ip + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP) && ip->protocol == IPPROTO_ICMP) {
		n = bpf_map_lookup_elem(&icmp_count, &zero);
		if (n)
			__sync_fetch_and_add(n, 1);
	}
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
