// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0)
//
// kvroute's sk_reuseport program: picks which worker's listener takes a new
// connection. The kernel's own reuseport choice is a hash of the 4-tuple, which
// spreads connections but not load: LLM clients hold streams open for minutes,
// so a few unlucky hashes pile streams onto one core. Here the data plane
// publishes each worker's live streams and the program sends the connection to
// the less loaded of two hash-derived candidates (power of two choices).
//
// Built by `cargo xtask build-ebpf`; the object is committed (ebpf/obj/) so a
// machine without clang still builds kvroute. Map layouts must match
// ebpf/src/lib.rs.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define MAX_WORKERS 256

enum kvr_mode {
	KVR_MODE_P2C = 0,
	KVR_MODE_HASH = 1,
	KVR_MODE_CPU = 2,
};

struct kvr_config {
	__u32 workers;
	__u32 mode;
};

// Written by worker k only (one map update per accept and per close), so no
// slot ever has two writers.
struct kvr_slot {
	__u32 live;     // connections open on the worker
	__u32 accepted; // connections the worker accepted (wrapping), see kvr_steered
};

// LIBBPF_PIN_BY_NAME: the loader reuses maps pinned by a running kvroute, which
// is how an upgraded process joins the same socket array.
struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32)); // an fd; aya's ReusePortSockArray wants 4 bytes
	__uint(max_entries, MAX_WORKERS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kvr_sockets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct kvr_slot);
	__uint(max_entries, MAX_WORKERS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kvr_live SEC(".maps");

// Connections this program sent to each worker (wrapping). A SYN is steered
// long before the worker accepts it; counting `steered - accepted` as load
// stops a burst of SYNs, which all see the same published counts, from landing
// on one worker. Only this program writes it, with atomic adds.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, MAX_WORKERS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kvr_steered SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct kvr_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kvr_config SEC(".maps");

// Pid of the process whose listeners fill kvr_sockets; the program ignores it.
// A later start removes pins whose owner is gone (a SIGKILLed kvroute cannot
// clean up), so bpffs does not collect one set of maps per crash.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kvr_owner SEC(".maps");

// Pending connections above this are a leak (a handshake that never reached
// accept), not load; the data plane also reconciles them away when idle.
#define MAX_PENDING 4096

static __always_inline __u32 load_of(__u32 w)
{
	struct kvr_slot *s = bpf_map_lookup_elem(&kvr_live, &w);
	__u32 *steered = bpf_map_lookup_elem(&kvr_steered, &w);
	if (!s || !steered)
		return 0xffffffff;
	__u32 pending = *steered - s->accepted;
	if ((__s32)pending < 0 || pending > MAX_PENDING)
		pending = 0;
	return s->live + pending;
}

static __always_inline int steer(struct sk_reuseport_md *md)
{
	__u32 zero = 0;
	struct kvr_config *cfg = bpf_map_lookup_elem(&kvr_config, &zero);
	// No config yet, or nonsense: SK_PASS without a selection leaves the choice
	// to the kernel's hash, so a half-initialised group still accepts.
	if (!cfg)
		return SK_PASS;
	__u32 n = cfg->workers;
	if (n == 0 || n > MAX_WORKERS)
		return SK_PASS;

	__u32 hash = md->hash;
	__u32 pick;
	switch (cfg->mode) {
	case KVR_MODE_CPU:
		// Workers are pinned round-robin to cores, so worker cpu % n runs on
		// the core that took the SYN.
		pick = bpf_get_smp_processor_id() % n;
		break;
	case KVR_MODE_HASH:
		pick = hash % n;
		break;
	default: {
		__u32 a = hash % n;
		pick = a;
		if (n > 1) {
			// The second candidate is never the first: with two workers p2c
			// is then exact least-loaded, and with many it is two real choices.
			__u32 b = (a + 1 + (hash >> 16) % (n - 1)) % n;
			if (load_of(b) < load_of(a))
				pick = b;
		}
		break;
	}
	}

	if (bpf_sk_select_reuseport(md, &kvr_sockets, &pick, 0) != 0)
		// Empty slot (a worker gone, an upgrade mid-swap): the kernel hash
		// still finds a live socket of the group.
		return SK_PASS;
	__u32 *steered = bpf_map_lookup_elem(&kvr_steered, &pick);
	if (steered)
		__sync_fetch_and_add(steered, 1);
	return SK_PASS;
}

SEC("sk_reuseport")
int kvr_select(struct sk_reuseport_md *md)
{
	return steer(md);
}

// Same choice, also run when a closing listener's queued connections migrate
// to another socket of the group (net.ipv4.tcp_migrate_req = 1, Linux 5.14+):
// during an upgrade the old process's backlog lands on the new workers.
SEC("sk_reuseport/migrate")
int kvr_select_migrate(struct sk_reuseport_md *md)
{
	return steer(md);
}

char LICENSE[] SEC("license") = "Dual Apache-2.0/GPL";
