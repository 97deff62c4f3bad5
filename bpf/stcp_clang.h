/* SPDX-License-Identifier: Apache-2.0 */
/* bcc's dialect for a plain clang build of stcp_xdp.c (a libbpf object, BTF included).
 *
 * stcp/datapath/xdp_object.py compiles stcp_xdp.c with `clang -target bpf -include
 * stcp_clang.h` after rewriting the few things a macro cannot reach: a map method call
 * `name.lookup(k)` becomes `stcp_map_lookup(&name, k)`, `BPF_TABLE("lru_hash", ...)` becomes
 * `BPF_TABLE_lru_hash(...)`, and the entry point gets its SEC("xdp"). Everything else the
 * program uses (the BPF_* map declarations, bpf_htons, helpers) is defined here, so the
 * bcc build and this one compile the same source. libxdp loads the result as a component
 * of its multi-program dispatcher, which needs the BTF that bcc's build does not carry.
 */
#ifndef STCP_CLANG_H
#define STCP_CLANG_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* BTF-defined maps, named after their variables as bcc names them. */
#define STCP_BTF_MAP(_type, _kt, _vt, _name, _n)                                   \
	struct {                                                                \
		__uint(type, _type);                                            \
		__type(key, _kt);                                               \
		__type(value, _vt);                                             \
		__uint(max_entries, _n);                                        \
	} _name SEC(".maps")

#define BPF_ARRAY(_name, _vt, _n)          STCP_BTF_MAP(BPF_MAP_TYPE_ARRAY, __u32, _vt, _name, _n)
#define BPF_PERCPU_ARRAY(_name, _vt, _n)   STCP_BTF_MAP(BPF_MAP_TYPE_PERCPU_ARRAY, __u32, _vt, _name, _n)
#define BPF_HASH(_name, _kt, _vt, _n)      STCP_BTF_MAP(BPF_MAP_TYPE_HASH, _kt, _vt, _name, _n)
#define BPF_TABLE_array(_kt, _vt, _name, _n)         STCP_BTF_MAP(BPF_MAP_TYPE_ARRAY, _kt, _vt, _name, _n)
#define BPF_TABLE_percpu_array(_kt, _vt, _name, _n)  STCP_BTF_MAP(BPF_MAP_TYPE_PERCPU_ARRAY, _kt, _vt, _name, _n)
#define BPF_TABLE_hash(_kt, _vt, _name, _n)          STCP_BTF_MAP(BPF_MAP_TYPE_HASH, _kt, _vt, _name, _n)
#define BPF_TABLE_lru_hash(_kt, _vt, _name, _n)      STCP_BTF_MAP(BPF_MAP_TYPE_LRU_HASH, _kt, _vt, _name, _n)
#define BPF_TABLE_percpu_hash(_kt, _vt, _name, _n)   STCP_BTF_MAP(BPF_MAP_TYPE_PERCPU_HASH, _kt, _vt, _name, _n)

/* An XSKMAP holds socket fds: sizes, no BTF types (the kernel refuses BTF for it). */
#define BPF_XSKMAP(_name, _n)                                                   \
	struct {                                                                \
		__uint(type, BPF_MAP_TYPE_XSKMAP);                              \
		__uint(key_size, sizeof(__u32));                                \
		__uint(value_size, sizeof(__u32));                              \
		__uint(max_entries, _n);                                        \
	} _name SEC(".maps")

/* bcc's map methods, with the semantics bcc gives them. */
#define stcp_map_lookup(_m, _k)            bpf_map_lookup_elem(_m, _k)
#define stcp_map_insert(_m, _k, _v)        bpf_map_update_elem(_m, _k, _v, BPF_NOEXIST)
#define stcp_map_update(_m, _k, _v)        bpf_map_update_elem(_m, _k, _v, BPF_ANY)
#define stcp_map_delete(_m, _k)            bpf_map_delete_elem(_m, _k)
#define stcp_map_redirect_map(_m, _i, _f)  bpf_redirect_map(_m, _i, _f)

/* The kernel grants helpers by this string; "GPL" is what bcc declares for every program
 * it loads (its BPF_LICENSE default), so both builds get the same treatment. */
char _license[] SEC("license") = "GPL";

#endif /* STCP_CLANG_H */
