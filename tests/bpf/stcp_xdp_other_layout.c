/* SPDX-License-Identifier: Apache-2.0 */
/* Stands in for the STCP XDP program of another stcp version in tests/test_xdp_coexist.py:
 * named stcp_xdp like it, with a map set this version does not know (as the map layout 4
 * program, which had no half-open table or cookie map, is to layout 5). It passes
 * everything. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} stcp_config SEC(".maps");

SEC("xdp")
int stcp_xdp(struct xdp_md *ctx)
{
	__u32 zero = 0;

	bpf_map_lookup_elem(&stcp_config, &zero);
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
