/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Shared between bpf/steering.bpf.c and user space (agent/steering,
 * tests): sizes, policies, map value layouts and the selection decision.
 *
 * Plain C, no helper calls: the decision function below is compiled into the
 * BPF program and into host unit tests alike.
 *
 * Maps of one listener (pinned under <bpffs>/<listener>/ by the agent):
 *   shards       REUSEPORT_SOCKARRAY[PF_MAX_SHARDS]  shard index -> socket
 *   generations  ARRAY[2] of struct pf_generation     two table generations
 *   config       ARRAY[1] of struct pf_config         active generation
 *   counters     PERCPU_ARRAY[PF_COUNTER_SLOTS] of struct pf_counters
 *   spill        ARRAY[2] of struct pf_spill          per generation
 *   least        ARRAY[2] of struct pf_least          per generation
 *   conns        ARRAY[1] of struct pf_conns          connections per shard
 *
 * A table rewrite fills the inactive generation (policy, indirection table,
 * CPU table, and its spill entry) and then flips the single word
 * config.active, so the program never reads a half-written table.
 *
 * Why the spill shares are a map of their own and not a field of struct
 * pf_generation: the maps are pinned and outlive the agent. A field added to
 * pf_generation would change the value size of the pinned "generations" map,
 * so an upgraded agent would find an incompatible map at restart,
 * re-adoption or takeover and would have to recreate it (and the program's
 * other maps with it) under live traffic. A separate map keeps every existing
 * map's layout: an upgraded agent reuses the old pins as they are and only
 * adds "spill" (all zero: no spill, today's behaviour) to the directory.
 * "least" and "conns" (the LEAST_CONNECTIONS policy) came later for the same
 * reason; all zero they are never read (no generation names that policy).
 */
#ifndef PORTFLEET_BPF_STEERING_SHARED_H_
#define PORTFLEET_BPF_STEERING_SHARED_H_

#include <linux/types.h>

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#define PF_MAX_SHARDS 64
#define PF_TABLE_SIZE 256 /* power of two: slot = hash & (size - 1) */
#define PF_MAX_CPUS 256
#define PF_GENERATIONS 2
/* Counter slot PF_MAX_SHARDS counts decisions that had no shard at all
 * (no table yet, or an empty table for the CPU/hash). */
#define PF_COUNTER_SLOTS (PF_MAX_SHARDS + 1)
#define PF_NO_SHARD 0xffffffffu
/* Spill shares are out of PF_SPILL_SCALE new connections of a CPU, compared
 * with the flow hash's top 8 bits: the indirection table uses its low 8 bits,
 * and the choice among a CPU's shards (hash % count) does not depend on the
 * top byte for a power-of-two count and hardly so for others. */
#define PF_SPILL_SCALE 256
#define PF_SPILL_SHIFT 24

enum pf_policy {
	PF_POLICY_NONE = 0, /* nothing applied yet: kernel's own hash */
	PF_POLICY_HASH = 1, /* flow hash -> indirection table */
	PF_POLICY_CPU = 2,  /* SYN's CPU -> that CPU's shards (by hash) */
	PF_POLICY_LEAST = 3, /* fewest connections per weight (pf_least) */
};

/* The shards of one CPU: cpu_shards[first .. first + count). */
struct pf_cpu_range {
	__u32 first;
	__u32 count; /* 0: no shard on this CPU, use the indirection table */
};

/* One table generation; written whole while inactive. */
struct pf_generation {
	__u32 policy;     /* enum pf_policy */
	__u32 num_shards; /* shards named by the tables (informational) */
	__u32 table[PF_TABLE_SIZE];  /* slot -> shard index */
	struct pf_cpu_range cpu[PF_MAX_CPUS];
	__u32 cpu_shards[PF_MAX_SHARDS];
};

/*
 * CPU policy: of every PF_SPILL_SCALE new connections that a CPU with shards
 * receives, share[cpu] go to the indirection table (which the rebalancer
 * weights toward cold shards) instead of that CPU's own shards. 0 everywhere
 * = no spill. Entry k belongs to generation k and is written with it.
 */
struct pf_spill {
	__u16 share[PF_MAX_CPUS]; /* 0 .. PF_SPILL_SCALE */
};

/*
 * LEAST_CONNECTIONS policy: each shard's weight (0 = no new connections),
 * entry k for generation k, written with it; the shard with the fewest
 * connections per unit of weight gets the next one. The generation's
 * indirection table (built from the same weights) is the fallback when no
 * shard has a weight.
 */
struct pf_least {
	__u32 weight[PF_MAX_SHARDS];
};

/*
 * LEAST_CONNECTIONS policy: connections per shard. The agent writes the
 * count it measured (worker load reports, or the kernel's) every load
 * period; the program adds one for each connection it steers in between,
 * so a burst of new connections spreads before the next measurement.
 */
struct pf_conns {
	__u64 count[PF_MAX_SHARDS];
};

struct pf_config {
	__u32 active; /* generation the program reads: 0 or 1 */
	__u32 pad;
};

/* Per shard, per CPU. */
struct pf_counters {
	__u64 selected; /* new connection steered to this shard */
	__u64 migrated; /* queued/half-open connection moved to this shard */
	__u64 fallback; /* intended for this shard, slot empty: kernel chose */
};

/* CPU policy: this connection of `cpu` goes to the indirection table. */
static __always_inline int pf_spills(const struct pf_spill *spill, __u32 hash,
				     __u32 cpu)
{
	if (!spill || cpu >= PF_MAX_CPUS)
		return 0;
	return (hash >> PF_SPILL_SHIFT) < spill->share[cpu];
}

/*
 * The selection decision: a shard index, or PF_NO_SHARD when nothing is
 * configured (the program then lets the kernel choose). `spill` (of the same
 * generation as `gen`; may be NULL) applies to the CPU policy only. Under
 * LEAST_CONNECTIONS this is the indirection table's choice, the fallback of
 * pf_select_least below.
 */
static __always_inline __u32 pf_select_shard(const struct pf_generation *gen,
					     const struct pf_spill *spill,
					     __u32 hash, __u32 cpu)
{
	__u32 shard;

	if (!gen)
		return PF_NO_SHARD;
	if (gen->policy == PF_POLICY_CPU && cpu < PF_MAX_CPUS) {
		__u32 first = gen->cpu[cpu].first;
		__u32 count = gen->cpu[cpu].count;

		if (count > 0 && count <= PF_MAX_SHARDS &&
		    first < PF_MAX_SHARDS && !pf_spills(spill, hash, cpu)) {
			__u32 idx = (first + hash % count) & (PF_MAX_SHARDS - 1);

			shard = gen->cpu_shards[idx];
			return shard < PF_MAX_SHARDS ? shard : PF_NO_SHARD;
		}
		/* no shard pinned to this CPU, or spilled: the table */
	} else if (gen->policy != PF_POLICY_HASH &&
		   gen->policy != PF_POLICY_CPU &&
		   gen->policy != PF_POLICY_LEAST) {
		return PF_NO_SHARD;
	}
	shard = gen->table[hash & (PF_TABLE_SIZE - 1)];
	if (shard >= PF_MAX_SHARDS)
		return PF_NO_SHARD;
	return shard;
}

/*
 * LEAST_CONNECTIONS: the shard with the fewest connections per unit of
 * weight (count_a * weight_b < count_b * weight_a; counts and weights stay
 * far below 2^32, so the products fit). The scan starts at a shard chosen
 * by the flow hash, so that ties (an idle listener) spread like the hash
 * does instead of all going to shard 0. PF_NO_SHARD when no shard has a
 * weight or a map is missing: the caller then uses the indirection table.
 *
 * The BPF program runs the scan with bpf_loop(), one pf_least_consider()
 * per shard: an open-coded loop of 64 steps is more than the verifier
 * accepts for an agent without CAP_PERFMON (its Spectre checks explore
 * every branch of every step). pf_select_least() is the same scan as a
 * plain loop, for user space and tests.
 */
struct pf_least_best {
	__u32 start; /* first shard scanned: hash % n */
	__u32 n;     /* shards scanned */
	__u32 shard; /* PF_NO_SHARD until a shard with a weight is seen */
	__u32 pad;
	__u64 count;
	__u64 weight;
};

/* Step i of the scan (0 <= i < best->n). */
static __always_inline void pf_least_consider(const struct pf_least *least,
					      const struct pf_conns *conns,
					      __u32 i,
					      struct pf_least_best *best)
{
	__u32 idx = best->start + i;
	__u64 c, w;

	if (idx >= best->n)
		idx -= best->n;
	idx &= PF_MAX_SHARDS - 1;
	w = least->weight[idx];
	if (w == 0)
		return;
	c = conns->count[idx];
	if (best->shard == PF_NO_SHARD || c * best->weight < best->count * w) {
		best->shard = idx;
		best->count = c;
		best->weight = w;
	}
}

/* The scan's start; 0 when there is nothing to scan (best->n == 0). */
static __always_inline void pf_least_begin(const struct pf_generation *gen,
					   __u32 hash,
					   struct pf_least_best *best)
{
	__u32 n = gen ? gen->num_shards : 0;

	best->shard = PF_NO_SHARD;
	best->count = 0;
	best->weight = 0;
	best->pad = 0;
	best->n = n > 0 && n <= PF_MAX_SHARDS ? n : 0;
	best->start = best->n ? hash % best->n : 0;
}

static __always_inline __u32 pf_select_least(const struct pf_generation *gen,
					     const struct pf_least *least,
					     const struct pf_conns *conns,
					     __u32 hash)
{
	struct pf_least_best best;
	__u32 i;

	if (!gen || !least || !conns)
		return PF_NO_SHARD;
	pf_least_begin(gen, hash, &best);
	for (i = 0; i < best.n; i++)
		pf_least_consider(least, conns, i, &best);
	return best.shard;
}

#endif /* PORTFLEET_BPF_STEERING_SHARED_H_ */
