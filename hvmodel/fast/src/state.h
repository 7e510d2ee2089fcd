// The fast engine's model state: one structure of arrays that every kernel-path header shares.
//
// The reference keeps the model in objects (Kvm, KvmVcpu, KvmMmuPage, ...); here the same state
// lives in flat arrays indexed by integer handles: pCPU numbers, VM slots, vCPU slots (a VM's
// vCPUs are contiguous), root slots, page ids, cpumask rows. Lists the kernel iterates in order
// (kvm->roots, tdp_mmu_roots, the shadow page hash) are intrusive doubly-linked lists through
// the root arrays, so roots are visited in exactly the reference's order (which decides which
// freed page a new root reuses).
//
// This is the bottom layer: storage and data-structure helpers only, no kernel behaviour.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <deque>
#include <memory>
#include <type_traits>
#include <vector>

namespace hv {

using i64 = int64_t;
using u64 = uint64_t;
using u32 = uint32_t;

constexpr i64 NONE = -1;  // no slot / INVALID_PAGE
constexpr int ROOT_MMU = 0, GUEST_MMU = 1;
constexpr int SLOTS = 4;  // root, prev_roots[0..2] (KVM_MMU_NUM_PREV_ROOTS = 3)
constexpr int PAGE_SHIFT = 12;
constexpr i64 DUMMY_ROOT_HPA = 0;
// a kvm_mmu_memory_cache's capacity; mmu_topup_memory_caches()'s minimum for the page cache
constexpr i64 KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE = 40, PT64_ROOT_MAX_LEVEL = 5;
constexpr i64 KVM_MAX_VCPUS = 4096;

// kvm_mmu_page_role, packed: level | direct | guest_mode | smm | ad_disabled
constexpr i64 ROLE_DIRECT = 1 << 4, ROLE_GUEST_MODE = 1 << 5, ROLE_SMM = 1 << 6, ROLE_AD_DISABLED = 1 << 7;

// vcpu->requests (hvmodel/kvm_host.py)
constexpr i64 KVM_REQ_TLB_FLUSH = 1 << 0, KVM_REQ_TLB_FLUSH_CURRENT = 1 << 1, KVM_REQ_TLB_FLUSH_GUEST = 1 << 2,
              KVM_REQ_MMU_FREE_OBSOLETE_ROOTS = 1 << 3, KVM_REQ_LOAD_MMU_PGD = 1 << 4;
constexpr i64 KVM_MMU_ROOT_CURRENT = 1, KVM_MMU_ROOTS_ALL = (1 << SLOTS) - 1;
constexpr int OUTSIDE_GUEST_MODE = 0, IN_GUEST_MODE = 1;
constexpr i64 VMX_NR_VPIDS = 1 << 16;

// hvmodel.metrics names, in the same order (engine.py checks them against the Python lists)
enum Counter { IPI_FLUSH, IPI_VMCLEAR, VMEXITS_FROM_IPI, INVEPT_SINGLE, INVEPT_GLOBAL, INVVPID, MIGRATIONS,
               VMCS_FIRST_LOADS, PCPU_CHANGES, STALE_TLB_USES, NOISE_EVENTS, RT_BUDGET_VIOLATIONS,
               VM_EXITS, HALTS, PREEMPTIONS, GUEST_NS, STEAL_NS, N_COUNTERS };
enum Float { FLUSH_OVERHEAD_US, NOISE_US, NOISE_MAX_SINGLE_US, NOISE_MAX_WINDOW_US, N_FLOATS };
enum Replicated { EVENTS, ROOT_ALLOCS, ROOT_FREES, REMOTE_FLUSHES, HV_FLUSH_HYPERCALLS, VPID_EXHAUSTED,
                  CPUMASK_BYTES_PEAK, VCPU_NS, N_REPLICATED };
enum Hazard { H1, H4, H3, H5, H2, N_HAZARDS };
// hvmodel.cost.CostModel fields, in this order
enum Cost { C_IPI_SEND, C_IPI_RECEIVE, C_VMEXIT, C_INVEPT_SINGLE, C_INVEPT_GLOBAL, C_INVVPID, C_VMCS_MIGRATE,
            C_REFILL, C_HV_FLUSH, N_COSTS };
// a stale-use example; metrics.first_examples sorts on the first four
enum Example { EX_T, EX_PCPU, EX_VM, EX_VCPU, EX_KIND, EX_MMU, EX_ROOT, EX_HPA, EX_EPOCH, EX_CACHED_ROOT,
               EX_CACHED_VM, EX_CACHED_EPOCH, N_EX };

// Trace event kinds (hvmodel.trace.Ev)
enum Ev { VM_CREATE = 1, VM_DESTROY, VCPU_LOAD, VCPU_PUT, VM_ENTRY, VM_EXIT, ZAP, MEMSLOT_DELETE, SMM_ENTER,
          SMM_EXIT, NESTED_VMENTER, NESTED_VMEXIT, L1_INVEPT, MMU_RESET_CONTEXT, GUEST_TLB_FLUSH, NEED_RESCHED };
constexpr i64 NESTED_NO_EPT = i64(1) << 32, NESTED_EPTP_NOT_BACKED = i64(1) << 33;
constexpr i64 ZAP_FLOOD = i64(1) << 32;  // zap: kvm_mmu_track_write() zaps the shadow root itself
constexpr i64 PUT_PREEMPTED = 2;         // vcpu_put: arg 1 halt, 2 preempted (hvmodel.trace.PUT_REASONS)

// Errors a trace can cause (engine.py has their messages)
enum Error { ERR_NONE, ERR_NO_VM, ERR_NO_VCPU, ERR_NOT_LOADED, ERR_NO_PCPU, ERR_HOST_ON_GUEST_CPU, ERR_VM_EXISTS,
             ERR_NO_NODE, ERR_DESTROY_LOADED, ERR_ALREADY_LOADED, ERR_PCPU_BUSY, ERR_SMM_ENTER, ERR_SMM_EXIT,
             ERR_NESTED_IN_L2, ERR_NESTED_IN_SMM, ERR_NOT_IN_L2, ERR_INVEPT_IN_L2, ERR_UNKNOWN_KIND,
             ERR_ROOTS_LEAKED, ERR_NOT_NODE_LOCAL };

template <class T>
void grow(std::vector<T>& v, size_t n, T fill = T()) {
    if (v.size() < n) v.resize(n, fill);
}

// Zeroed rows of `width` values, each allocated once and reused (a generation table is 32 KiB at
// 8192 CPUs: growing one big array would copy them all).
template <class T>
class RowPool {
   public:
    explicit RowPool(i64 width) : width_(width) {}
    // Deep copies (hvbench-check); assignment reuses the rows it has.
    RowPool(const RowPool& o) { *this = o; }
    RowPool& operator=(const RowPool& o) {
        width_ = o.width_, free_ = o.free_;
        if (rows_.size() > o.rows_.size()) rows_.resize(o.rows_.size());
        while (rows_.size() < o.rows_.size()) rows_.emplace_back(new T[width_]);
        for (size_t r = 0; r < rows_.size(); r++) std::copy_n(o.rows_[r].get(), width_, rows_[r].get());
        return *this;
    }
    i64 alloc() {
        i64 r;
        if (!free_.empty()) {
            r = free_.back();
            free_.pop_back();
        } else {
            r = i64(rows_.size());
            rows_.emplace_back(new T[width_]);
        }
        std::fill_n(rows_[r].get(), width_, T(0));
        return r;
    }
    void release(i64 r) { free_.push_back(r); }
    T* row(i64 r) { return rows_[r].get(); }
    const T* row(i64 r) const { return rows_[r].get(); }

   private:
    i64 width_;
    std::vector<std::unique_ptr<T[]>> rows_;
    std::vector<i64> free_;
};

struct Config {
    i64 n_cpus, n_nodes;
    bool hyperv, ept_ad;
    i64 cluster;  // x2APIC cluster size (1: physical mode)
    std::vector<bool> owned;
    bool split = false;       // a shard that replays only the VMs of its own nodes...
    std::vector<bool> local;  // ...these pCPUs' nodes
    double cost[N_COSTS];
    i64 noise_period_ns;
    double noise_threshold_us, noise_budget_us;
    i64 max_examples;
    i64 policy;  // strategy code (policy.h)
    bool elide_migration_flush = false;  // B and C: the reading of B's migration flush
    bool first_visit_global = false;     // C: first_visit_flush=global
    bool mask_reset_on_reference = false;  // E: mask_lifetime=reference
    bool mask_cache = false;               // E: mask_source=memory_cache
    bool page_cached = false;              // host.page_reuse=cached
    i64 rcu_grace_ns = 0;
    i64 mmus;    // D's flush set: bit 0 root_mmu, bit 1 guest_mmu
    bool prev_roots;
    i64 mask_bytes, table_bytes;  // one strategy cpumask, one generation table (F)
};

struct State {
    // --- host configuration
    i64 n_cpus, n_nodes, words;  // words: u64 words in a cpumask
    bool hyperv, ept_ad;
    i64 cluster;
    std::vector<char> owned;  // pCPUs whose TLBs and counters this engine keeps
    bool split;               // only the VMs of the local pCPUs' nodes are replayed here
    std::vector<char> local;
    std::vector<i64> local_cpus;
    double cost[N_COSTS];
    i64 noise_period_ns;
    double noise_threshold_us, noise_budget_us;
    i64 max_examples, policy, mmus;
    bool elide_migration_flush, first_visit_global, mask_reset_on_reference, mask_cache, prev_roots, page_cached;
    i64 rcu_grace_ns;
    i64 mask_bytes, table_bytes;

    // --- the event being replayed
    i64 now = 0, this_cpu = 0;  // time_ns, smp_processor_id()
    int err = ERR_NONE;
    i64 err_args[4] = {0, 0, 0, 0};
    i64 events = 0;

    // --- pCPUs
    std::vector<i64> running, in_guest;  // vCPU loaded here and not put; vCPU in IN_GUEST_MODE here
    std::vector<i64> guest_since;        // when the vCPU in guest mode here entered (GUEST_NS)
    std::vector<i64> mark;               // scratch: pCPU marks, compared with mark_now
    i64 mark_now = 0;
    std::vector<i64> scratch;            // scratch: a sorted pCPU list

    // --- TLBs: per pCPU, the EP4TAs it caches (unordered rows of tlb_n[cpu] entries, width tlb_w)
    i64 tlb_w = 4;
    std::vector<i64> tlb_n, tlb_pid, tlb_serial, tlb_rid, tlb_vmid, tlb_epoch;
    std::vector<char> tlb_missed;  // a remote flush could not reach the entry (H4)

    // --- pages: pid = pfn * n_nodes + node; hpa = ((node << 36) | pfn) << PAGE_SHIFT
    std::vector<u64> holders;  // per page, a cpumask row: owned pCPUs caching it
    std::vector<std::vector<i64>> pool;  // per node: LIFO of freed pages
    std::vector<std::vector<i64>> v_pcache;     // page_reuse=cached: per vCPU, its page cache
    std::deque<std::array<i64, 3>> rcu;         // page_reuse=cached: (free time, node, page)
    std::vector<i64> next_pfn;           // pfn 0 of node 0 is the zero page (dummy root)

    // --- VPIDs (vmx_vpid_bitmap): a min-heap of freed ones, all below vpid_next
    std::vector<i64> vpid_heap;
    i64 vpid_next = 1;

    // --- roots (struct kvm_mmu_page); slots reused through r_free
    std::vector<i64> r_vm, r_id, r_serial, r_role, r_gfn, r_pid, r_count, r_epoch, r_vgen;
    std::vector<char> r_invalid, r_tdp, r_sched, r_inhash;  // ..., tdp_mmu_page, tdp_mmu_scheduled_root_to_zap
    std::vector<i64> r_next, r_prev, r_tnext, r_tprev, r_hnext, r_hprev;  // kvm->roots, tdp_mmu_roots, hash order
    std::vector<i64> r_row, r_gen;  // strategy cpumask or generation table; F's generation
    std::vector<i64> r_free;
    i64 next_serial = 1;  // r_serial: unique for the run, the identity of a root

    // --- VMs (struct kvm); slots reused through vm_free; map: id -> slot
    std::vector<i64> vm_ext, vm_nvcpus, vm_vcpu0, vm_level, vm_node, vm_vgen, vm_hv_root, vm_next_rid;
    std::vector<i64> vm_rhead, vm_rtail, vm_thead, vm_ttail, vm_hhead, vm_htail, vm_row;
    std::vector<i64> vm_created;  // creation time (VCPU_NS)
    std::vector<i64> vm_free;
    std::vector<i64> map_keys, map_vals;  // open addressing, linear probing
    i64 map_fill = 0;                     // keys in use, deleted ones included

    // --- vCPUs (struct kvm_vcpu + vcpu_vmx), contiguous per VM; freed blocks reused by size
    std::vector<i64> v_vm, v_idx, v_cpu, v_mode, v_req, v_lvmcs, v_vpid, v_vpid02, v_vpid12, v_eptp12, v_hv_root, v_mmu;
    std::vector<char> v_loaded, v_gmode, v_smm, v_vmxon, v_backed;  // ..., is_guest_mode(), ..., nested_eptp12_backed
    std::vector<char> v_resched;  // TIF_NEED_RESCHED on the vCPU thread (kvm.need_resched)
    std::vector<i64> v_preempted;  // vcpu->preempted: put while runnable at this time, else NONE (STEAL_NS)
    std::vector<i64> v_vmcs;   // [v][2]: loaded_vmcs->cpu of vmcs01, vmcs02
    std::vector<i64> m_role;   // [v][2]: root_role of root_mmu, guest_mmu
    std::vector<char> m_fast;  // [v][2]: root_via_fast_switch
    std::vector<i64> m_pgd, m_hpa, m_sp;  // [v][2][SLOTS]: root, prev_roots; m_sp = root slot, -1 if special
    i64 v_used = 0;
    std::vector<i64> vblock_free, v_next_free;  // per size: first freed block

    // --- strategy state: cpumask rows (E, C) and generation tables (F: generation + 1 per pCPU);
    // E's per-vCPU mask caches (mask_source=memory_cache)
    std::vector<i64> v_mcache;
    RowPool<u64> rows;
    RowPool<u32> gens;

    // --- metrics (hvmodel.metrics)
    std::vector<i64> cnt;     // [N_COUNTERS][n_cpus]
    std::vector<double> flt;  // [N_FLOATS][n_cpus]
    i64 vmc[N_REPLICATED] = {};
    i64 stale_kind[N_HAZARDS] = {};  // by the first kind that applies
    i64 stale_any[N_HAZARDS] = {};   // by every kind that applies
    i64 mask_now = 0;
    std::vector<i64> win;  // open noise window
    std::vector<double> win_noise;
    std::vector<char> irq_open;  // interruption open on the pCPU during this event
    std::vector<double> irq_us;
    std::vector<i64> irq_list;
    i64 irq_n = 0;
    std::vector<i64> ex;  // [max_examples + 1][N_EX]: the first stale uses, sorted
    i64 ex_n = 0;
    std::vector<i64> reentry;  // vCPUs kicked during this event (FIFO)
    size_t re_head = 0;

    // --- a split shard: on_each_cpu broadcasts that left it, and its strategy memory per event
    std::vector<i64> out_event, out_src, out_hpa;
    i64 event_peak = 0;  // the most mask bytes during the current event
    std::vector<i64> mask_event, mask_excursion, mask_change;

    explicit State(const Config& c)
        : n_cpus(c.n_cpus), n_nodes(c.n_nodes), words((c.n_cpus + 63) / 64), hyperv(c.hyperv), ept_ad(c.ept_ad),
          cluster(c.cluster), owned(c.owned.begin(), c.owned.end()), split(c.split),
          local(c.split ? c.local.begin() : c.owned.begin(), c.split ? c.local.end() : c.owned.end()),
          noise_period_ns(c.noise_period_ns),
          noise_threshold_us(c.noise_threshold_us), noise_budget_us(c.noise_budget_us), max_examples(c.max_examples),
          policy(c.policy), mmus(c.mmus),
          elide_migration_flush(c.elide_migration_flush), first_visit_global(c.first_visit_global),
          mask_reset_on_reference(c.mask_reset_on_reference), mask_cache(c.mask_cache), prev_roots(c.prev_roots),
          page_cached(c.page_cached), rcu_grace_ns(c.rcu_grace_ns), mask_bytes(c.mask_bytes), table_bytes(c.table_bytes),
          running(n_cpus, NONE), in_guest(n_cpus, NONE), guest_since(n_cpus, 0), mark(n_cpus, 0), scratch(n_cpus + 64),
          tlb_n(n_cpus, 0), pool(n_nodes), next_pfn(n_nodes, 1), map_keys(64, -1), map_vals(64, 0),
          vblock_free(KVM_MAX_VCPUS + 1, NONE), cnt(N_COUNTERS * n_cpus, 0), flt(N_FLOATS * n_cpus, 0.0),
          win(n_cpus, -1), win_noise(n_cpus, 0.0), irq_open(n_cpus, 0), irq_us(n_cpus, 0.0), irq_list(n_cpus),
          ex((c.max_examples + 1) * N_EX, 0), rows(words), gens(n_cpus) {
        for (int i = 0; i < N_COSTS; i++) cost[i] = c.cost[i];
        if (!split) std::fill(local.begin(), local.end(), 1);
        for (i64 cpu = 0; cpu < n_cpus; cpu++)
            if (local[cpu]) local_cpus.push_back(cpu);
        resize_tlb(tlb_w);
    }

    i64& c(int counter, i64 cpu) { return cnt[counter * n_cpus + cpu]; }
    double& f(int field, i64 cpu) { return flt[field * n_cpus + cpu]; }
    u64* holder_row(i64 pid) { return &holders[pid * words]; }
    bool page_known(i64 pid) const { return pid >= 0 && size_t((pid + 1) * words) <= holders.size(); }
    u64* row(i64 r) { return rows.row(r); }
    const u64* row(i64 r) const { return rows.row(r); }
    u32* gen_row(i64 r) { return gens.row(r); }
    const u32* gen_row(i64 r) const { return gens.row(r); }
    i64 vmcs(i64 v, int w) const { return v_vmcs[v * 2 + w]; }
    i64& vmcs(i64 v, int w) { return v_vmcs[v * 2 + w]; }
    i64& role(i64 v, int m) { return m_role[v * 2 + m]; }
    char& fast(i64 v, int m) { return m_fast[v * 2 + m]; }
    i64 slot(i64 v, int m, int k) const { return (v * 2 + m) * SLOTS + k; }

    void resize_tlb(i64 w) {
        auto widen = [&](auto& a) {
            std::remove_reference_t<decltype(a)> b(n_cpus * w);
            for (i64 cpu = 0; cpu < n_cpus && !a.empty(); cpu++)
                for (i64 k = 0; k < tlb_w; k++) b[cpu * w + k] = a[cpu * tlb_w + k];
            a.swap(b);
        };
        widen(tlb_pid), widen(tlb_serial), widen(tlb_rid), widen(tlb_vmid), widen(tlb_epoch), widen(tlb_missed);
        tlb_w = w;
    }
};

// --- cpumasks: rows of u64 words ---------------------------------------------------------------
inline bool bit_test(const u64* row, i64 cpu) { return (row[cpu >> 6] >> (cpu & 63)) & 1; }
inline void bit_set(u64* row, i64 cpu) { row[cpu >> 6] |= u64(1) << (cpu & 63); }
inline void bit_clear(u64* row, i64 cpu) { row[cpu >> 6] &= ~(u64(1) << (cpu & 63)); }

// The set bits of a row, ascending, into out; returns how many.
inline i64 bits_to_list(const u64* row, i64 words, i64* out) {
    i64 n = 0;
    for (i64 w = 0; w < words; w++)
        for (u64 word = row[w]; word; word &= word - 1) out[n++] = (w << 6) + __builtin_ctzll(word);
    return n;
}

// --- the VM id map ----------------------------------------------------------------------------
constexpr i64 MAP_EMPTY = -1, MAP_DELETED = -2;

inline size_t map_slot(const std::vector<i64>& keys, i64 key) {
    return size_t((key ^ (key >> 17)) * 0x5BD1E995) & (keys.size() - 1);
}

inline i64 map_get(const State& s, i64 key) {
    const size_t mask = s.map_keys.size() - 1;
    for (size_t i = map_slot(s.map_keys, key); s.map_keys[i] != MAP_EMPTY; i = (i + 1) & mask)
        if (s.map_keys[i] == key) return s.map_vals[i];
    return NONE;
}

// Put a key that is not in the map into the first free or deleted slot of its probe sequence.
inline void map_insert(std::vector<i64>& keys, std::vector<i64>& vals, i64& fill, i64 key, i64 value) {
    const size_t mask = keys.size() - 1;
    size_t i = map_slot(keys, key);
    while (keys[i] >= 0) i = (i + 1) & mask;
    if (keys[i] == MAP_EMPTY) fill++;
    keys[i] = key;
    vals[i] = value;
}

inline void map_put(State& s, i64 key, i64 value) {
    if (2 * (s.map_fill + 1) > i64(s.map_keys.size())) {
        std::vector<i64> keys(2 * s.map_keys.size(), MAP_EMPTY), vals(2 * s.map_keys.size(), 0);
        i64 fill = 0;
        for (size_t i = 0; i < s.map_keys.size(); i++)
            if (s.map_keys[i] >= 0) map_insert(keys, vals, fill, s.map_keys[i], s.map_vals[i]);
        s.map_keys.swap(keys), s.map_vals.swap(vals), s.map_fill = fill;
    }
    map_insert(s.map_keys, s.map_vals, s.map_fill, key, value);
}

inline void map_del(State& s, i64 key) {
    const size_t mask = s.map_keys.size() - 1;
    size_t i = map_slot(s.map_keys, key);
    while (s.map_keys[i] != key) i = (i + 1) & mask;
    s.map_keys[i] = MAP_DELETED;
}

}  // namespace hv
