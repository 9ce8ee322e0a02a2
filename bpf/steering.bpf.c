// SPDX-License-Identifier: GPL-2.0
/*
 * portfleet steering: an sk_reuseport program (attach type
 * BPF_SK_REUSEPORT_SELECT_OR_MIGRATE) that picks the shard socket of a
 * listener's reuseport group for every new connection, and a live shard for
 * every connection migrated off a shard that was shut down.
 *
 * Maps and the table protocol: see steering_shared.h.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "steering_shared.h"

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, PF_MAX_SHARDS);
	__type(key, __u32);
	__type(value, __u64);
} shards SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PF_GENERATIONS);
	__type(key, __u32);
	__type(value, struct pf_generation);
} generations SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pf_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PF_GENERATIONS);
	__type(key, __u32);
	__type(value, struct pf_spill);
} spill SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PF_GENERATIONS);
	__type(key, __u32);
	__type(value, struct pf_least);
} least SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pf_conns);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PF_COUNTER_SLOTS);
	__type(key, __u32);
	__type(value, struct pf_counters);
} counters SEC(".maps");

enum pf_outcome { PF_SELECTED, PF_MIGRATED, PF_FALLBACK };

static __always_inline void count(__u32 shard, enum pf_outcome outcome)
{
	struct pf_counters *c;
	__u32 key = shard < PF_MAX_SHARDS ? shard : PF_MAX_SHARDS;

	c = bpf_map_lookup_elem(&counters, &key);
	if (!c)
		return;
	if (outcome == PF_SELECTED)
		c->selected++;
	else if (outcome == PF_MIGRATED)
		c->migrated++;
	else
		c->fallback++;
}

/* LEAST_CONNECTIONS (cnt set): one more connection on `shard` until the
 * agent writes the next measured count. */
static __always_inline void add_connection(struct pf_conns *cnt, __u32 shard)
{
	if (cnt && shard < PF_MAX_SHARDS)
		__sync_fetch_and_add(&cnt->count[shard], 1);
}

/* Migration: the intended shard may be the one going away; take the first
 * live shard after it. */
static __always_inline int migrate(struct sk_reuseport_md *reuse, __u32 shard,
				   struct pf_conns *cnt)
{
	__u32 i, key;

	for (i = 0; i < PF_MAX_SHARDS; i++) {
		key = (shard + i) & (PF_MAX_SHARDS - 1);
		if (bpf_sk_select_reuseport(reuse, &shards, &key, 0) == 0) {
			count(key, PF_MIGRATED);
			add_connection(cnt, key);
			return SK_PASS;
		}
	}
	count(shard, PF_FALLBACK);
	return SK_PASS;
}

/* LEAST_CONNECTIONS: the scan of pf_select_least() with bpf_loop(). */
struct least_scan {
	struct pf_least_best best;
	__u32 active; /* generation of the weights */
};

static long least_step(__u32 i, void *data)
{
	struct least_scan *scan = data;
	struct pf_least *weights;
	struct pf_conns *cnt;
	__u32 zero = 0;

	weights = bpf_map_lookup_elem(&least, &scan->active);
	cnt = bpf_map_lookup_elem(&conns, &zero);
	if (!weights || !cnt)
		return 1;
	pf_least_consider(weights, cnt, i, &scan->best);
	return 0;
}

static __always_inline __u32 select_least(const struct pf_generation *gen,
					  __u32 active, struct pf_conns *cnt,
					  __u32 hash)
{
	struct least_scan scan;

	if (!cnt)
		return PF_NO_SHARD;
	pf_least_begin(gen, hash, &scan.best);
	scan.active = active;
	if (scan.best.n == 0)
		return PF_NO_SHARD;
	bpf_loop(scan.best.n, least_step, &scan, 0);
	return scan.best.shard;
}

SEC("sk_reuseport/migrate")
int pf_steer(struct sk_reuseport_md *reuse)
{
	struct pf_generation *gen = NULL;
	struct pf_spill *spl = NULL;
	struct pf_conns *cnt = NULL;
	struct pf_config *cfg;
	__u32 zero = 0, active = 0, shard, least_shard = PF_NO_SHARD;
	/* Read the context once: the verifier rejects ctx pointer arithmetic. */
	__u32 hash = reuse->hash;
	int migrating = reuse->migrating_sk != NULL;

	cfg = bpf_map_lookup_elem(&config, &zero);
	if (cfg) {
		active = cfg->active & (PF_GENERATIONS - 1);
		gen = bpf_map_lookup_elem(&generations, &active);
		spl = bpf_map_lookup_elem(&spill, &active);
	}
	if (gen && gen->policy == PF_POLICY_LEAST) {
		cnt = bpf_map_lookup_elem(&conns, &zero);
		least_shard = select_least(gen, active, cnt, hash);
	}
	shard = least_shard != PF_NO_SHARD ?
			least_shard :
			pf_select_shard(gen, spl, hash,
					bpf_get_smp_processor_id());

	if (migrating)
		return migrate(reuse, shard == PF_NO_SHARD ? hash : shard, cnt);
	if (shard == PF_NO_SHARD) {
		count(shard, PF_FALLBACK);
		return SK_PASS;
	}
	if (bpf_sk_select_reuseport(reuse, &shards, &shard, 0) == 0) {
		count(shard, PF_SELECTED);
		add_connection(cnt, shard);
	} else
		count(shard, PF_FALLBACK); /* empty slot or closed socket */
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
