// hvmodel.host for the fast engine: TLBs, local flush instructions, IPIs, guest mode, the
// Hyper-V flush hypercall, the page pool and the VPID bitmap.
//
// As in the reference, only these functions touch per-pCPU state, and each checks that the
// pCPU is owned; VM-level state (guest mode, kicks) is kept for every pCPU.
#pragma once

#include "oracle.h"

namespace hv {

constexpr i64 NO_FLUSH = -2;  // an IPI that only acknowledges (pid -1 is the dummy root: flushed, never cached)

// --- accounting -----------------------------------------------------------------------------
// Host time on an owned pCPU; inside an interruption it is also noise.
inline void charge(State& s, i64 cpu, double us) {
    s.f(FLUSH_OVERHEAD_US, cpu) += us;
    if (s.irq_open[cpu]) s.irq_us[cpu] += us;
}

inline void open_irq(State& s, i64 cpu) {
    if (!s.irq_open[cpu]) {
        s.irq_open[cpu] = 1;
        s.irq_list[s.irq_n++] = cpu;
    }
}

// Each pCPU's interruption of this event becomes one noise sample.
inline void close_irqs(State& s, i64 t_ns) {
    for (i64 i = 0; i < s.irq_n; i++) {
        i64 cpu = s.irq_list[i];
        record_noise(s, cpu, t_ns, s.irq_us[cpu]);
        s.irq_open[cpu] = 0;
        s.irq_us[cpu] = 0.0;
    }
    s.irq_n = 0;
}

// --- local flush instructions -----------------------------------------------------------------
inline void remove_entry(State& s, i64 cpu, i64 k) {
    i64 e = cpu * s.tlb_w + k, last = cpu * s.tlb_w + s.tlb_n[cpu] - 1;
    s.tlb_pid[e] = s.tlb_pid[last], s.tlb_serial[e] = s.tlb_serial[last], s.tlb_rid[e] = s.tlb_rid[last];
    s.tlb_vmid[e] = s.tlb_vmid[last], s.tlb_epoch[e] = s.tlb_epoch[last], s.tlb_missed[e] = s.tlb_missed[last];
    s.tlb_n[cpu]--;
}

// Remove the entries tagged pid from an owned pCPU; the guest pays to refill them.
inline bool drop(State& s, i64 cpu, i64 pid) {
    if (!s.page_known(pid) || !bit_test(s.holder_row(pid), cpu)) return false;
    remove_entry(s, cpu, tlb_find(s, cpu, pid));
    bit_clear(s.holder_row(pid), cpu);
    s.f(FLUSH_OVERHEAD_US, cpu) += s.cost[C_REFILL];
    return true;
}

// INVEPT type 1 on cpu for page pid (-1: the dummy root, which nothing caches).
inline void invept_single(State& s, i64 cpu, i64 pid) {
    if (!s.owned[cpu]) return;
    s.c(INVEPT_SINGLE, cpu)++;
    charge(s, cpu, s.cost[C_INVEPT_SINGLE]);
    drop(s, cpu, pid);
}

// INVEPT type 2 on cpu: drop every EP4TA, other VMs' included.
inline void invept_global(State& s, i64 cpu) {
    if (!s.owned[cpu]) return;
    s.c(INVEPT_GLOBAL, cpu)++;
    charge(s, cpu, s.cost[C_INVEPT_GLOBAL]);
    i64 n = s.tlb_n[cpu];
    for (i64 k = 0; k < n; k++) bit_clear(s.holder_row(s.tlb_pid[cpu * s.tlb_w + k]), cpu);
    s.f(FLUSH_OVERHEAD_US, cpu) += s.cost[C_REFILL] * double(n);
    s.tlb_n[cpu] = 0;
}

inline void vmcs_load_new_cpu(State& s, i64 cpu) {
    if (!s.owned[cpu]) return;
    s.c(MIGRATIONS, cpu)++;
    charge(s, cpu, s.cost[C_VMCS_MIGRATE]);
}

inline void invvpid(State& s, i64 cpu) {
    if (!s.owned[cpu]) return;
    s.c(INVVPID, cpu)++;
    charge(s, cpu, s.cost[C_INVVPID]);
}

// --- guest use of the TLB --------------------------------------------------------------------
inline void insert_entry(State& s, i64 cpu, i64 r) {
    if (s.tlb_n[cpu] == s.tlb_w) s.resize_tlb(2 * s.tlb_w);
    i64 e = cpu * s.tlb_w + s.tlb_n[cpu]++, pid = s.r_pid[r];
    s.tlb_pid[e] = pid, s.tlb_serial[e] = s.r_serial[r], s.tlb_rid[e] = s.r_id[r];
    s.tlb_vmid[e] = s.vm_ext[s.r_vm[r]], s.tlb_epoch[e] = s.r_epoch[r], s.tlb_missed[e] = 0;
    bit_set(s.holder_row(pid), cpu);
}

// VM entry on cpu with root slot r (-1: a special root, which maps nothing): check, then cache.
inline void tlb_enter(State& s, i64 cpu, i64 v, i64 r) {
    if (!s.owned[cpu] || r == NONE) return;
    i64 k = tlb_find(s, cpu, s.r_pid[r]);  // the pCPU's few entries: one cache line
    if (k == NONE) return insert_entry(s, cpu, r);
    i64 e = cpu * s.tlb_w + k;
    if (s.tlb_serial[e] != s.r_serial[r] || s.tlb_epoch[e] != s.r_epoch[r]) stale_use(s, cpu, v, r, e);
}

// --- guest mode (VM-level: every shard tracks every pCPU) -------------------------------------
inline void enter_guest(State& s, i64 v) {
    s.v_mode[v] = IN_GUEST_MODE;
    s.in_guest[s.v_cpu[v]] = v;
    s.guest_since[s.v_cpu[v]] = s.now;
}

inline void leave_guest(State& s, i64 v) {
    i64 cpu = s.v_cpu[v];
    s.v_mode[v] = OUTSIDE_GUEST_MODE;
    s.in_guest[cpu] = NONE;
    if (s.owned[cpu]) s.c(VM_EXITS, cpu)++, s.c(GUEST_NS, cpu) += s.now - s.guest_since[cpu];
}

// --- IPIs -----------------------------------------------------------------------------------
// x2APIC cluster mode: one ICR write per cluster with targets (physical mode: one per CPU);
// every online CPU but this one: one all-but-self shorthand write (native_send_call_func_ipi).
inline i64 icr_writes(const State& s, i64 targets, i64 clusters) { return targets == s.n_cpus - 1 ? 1 : clusters; }

// One IPI: kick the vCPU in guest mode there (VM-level), then, on an owned pCPU, receive it and
// run the handler. Targets are independent, so doing all of this target by target gives what
// the reference does in three vectorised passes.
inline void deliver(State& s, i64 dst, int counter, i64 flush_pid) {
    i64 v = s.in_guest[dst];
    bool kicked = v != NONE;
    if (kicked) {
        leave_guest(s, v);
        s.reentry.push_back(v);
    }
    if (!s.owned[dst]) return;
    s.c(counter, dst)++;
    open_irq(s, dst);
    charge(s, dst, s.cost[C_IPI_RECEIVE]);
    if (kicked) {
        s.c(VMEXITS_FROM_IPI, dst)++;
        charge(s, dst, s.cost[C_VMEXIT]);
    }
    if (flush_pid != NO_FLUSH) {
        s.c(INVEPT_SINGLE, dst)++;
        charge(s, dst, s.cost[C_INVEPT_SINGLE]);
        drop(s, dst, flush_pid);
    }
}

// Host.send_ipis to the sorted, distinct pCPUs cpus[0..n) (src, if among them, is skipped); with
// flush_pid != NO_FLUSH the handler is kvm_flush_tlb_root on that page.
inline void send_ipis(State& s, i64 src, const i64* cpus, i64 n, int counter, i64 flush_pid) {
    i64 t = 0, clusters = 0, last = -1;
    for (i64 i = 0; i < n; i++)
        if (cpus[i] != src) {
            t++;
            if (cpus[i] / s.cluster != last) clusters++, last = cpus[i] / s.cluster;
            if (!s.local[cpus[i]]) s.err = ERR_NOT_NODE_LOCAL;  // WARN_ON: a split shard sees only its own pCPUs
        }
    if (t == 0) return;
    if (s.owned[src]) charge(s, src, s.cost[C_IPI_SEND] * double(icr_writes(s, t, clusters)));
    for (i64 i = 0; i < n; i++)
        if (cpus[i] != src) deliver(s, cpus[i], counter, flush_pid);
}

// send_ipis to every online pCPU but src (on_each_cpu): one pass over the pCPUs. A split shard
// records the broadcast for the other shards' pCPUs (remote_on_each_cpu) and delivers to its own.
inline void send_ipis_all(State& s, i64 src, int counter, i64 flush_pid) {
    i64 t = s.n_cpus - 1;
    if (t == 0) return;
    if (s.owned[src]) charge(s, src, s.cost[C_IPI_SEND] * double(icr_writes(s, t, 0)));
    if (s.split && i64(s.local_cpus.size()) < s.n_cpus) {
        s.out_event.push_back(s.events), s.out_src.push_back(src), s.out_hpa.push_back(page_hpa(s, flush_pid));
        for (i64 cpu : s.local_cpus)
            if (cpu != src) deliver(s, cpu, counter, flush_pid);
        return;
    }
    for (i64 cpu = 0; cpu < s.n_cpus; cpu++)
        if (cpu != src) deliver(s, cpu, counter, flush_pid);
}

// The page of an hpa handed out to a root, or -1 (the zero page, or never handed out).
inline i64 page_id(const State& s, i64 hpa) {
    i64 pfn = (hpa >> PAGE_SHIFT) & ((i64(1) << 36) - 1), node = hpa >> 48;
    if (hpa <= 0 || node >= s.n_nodes || pfn >= s.next_pfn[node]) return NONE;
    return pfn * s.n_nodes + node;
}

// HvCallFlushGuestPhysicalAddressSpace: L0 drops EP4TA hpa on every pCPU; a vCPU running on
// that root keeps running and refills from the current root.
inline void hv_flush_guest_physical_address_space(State& s, i64 src, i64 hpa) {
    s.vmc[HV_FLUSH_HYPERCALLS]++;
    if (s.owned[src]) charge(s, src, s.cost[C_HV_FLUSH]);
    i64 pid = page_id(s, hpa);
    if (pid < 0) return;
    std::vector<i64> cpus(s.n_cpus);  // the loop drops and re-adds bits of the row
    i64 n = bits_to_list(s.holder_row(pid), s.words, cpus.data());
    for (i64 i = 0; i < n; i++) {
        i64 cpu = cpus[i];
        drop(s, cpu, pid);
        i64 v = s.in_guest[cpu];
        if (v != NONE) {
            int m = int(s.v_mmu[v]);
            if (s.m_hpa[s.slot(v, m, 0)] == hpa) tlb_enter(s, cpu, v, s.m_sp[s.slot(v, m, 0)]);
        }
    }
}

// --- the page allocator ---------------------------------------------------------------------
// PagePool.alloc: the page freed last on the node, else a new one.
inline i64 page_alloc(State& s, i64 node) {
    auto& freed = s.pool[node];
    if (!freed.empty()) {
        i64 pid = freed.back();
        freed.pop_back();
        return pid;
    }
    i64 pid = s.next_pfn[node]++ * s.n_nodes + node;
    grow(s.holders, size_t((pid + 1) * s.words));
    return pid;
}

// page_reuse=cached (mmu.PagePool): roots take pages from the vCPU's mmu_shadow_page_cache,
// which kvm_mmu_load() tops up (below PT64_ROOT_MAX_LEVEL objects, refill to 40); TDP root
// pages come back after an RCU grace period, shadow pages at once.
// PagePool.rcu_callbacks: pages whose grace period ended join the allocator before anything freed later.
inline void rcu_callbacks(State& s) {
    while (!s.rcu.empty() && s.rcu.front()[0] <= s.now) {
        s.pool[s.rcu.front()[1]].push_back(s.rcu.front()[2]);
        s.rcu.pop_front();
    }
}

inline void page_topup(State& s, i64 v, i64 node) {
    if (!s.page_cached) return;
    rcu_callbacks(s);
    auto& cache = s.v_pcache[v];
    if (i64(cache.size()) < PT64_ROOT_MAX_LEVEL)
        while (i64(cache.size()) < KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE) cache.push_back(page_alloc(s, node));
}

inline i64 root_page_alloc(State& s, i64 v, i64 node) {
    if (!s.page_cached) return page_alloc(s, node);
    i64 pid = s.v_pcache[v].back();
    s.v_pcache[v].pop_back();
    return pid;
}

inline void page_release(State& s, i64 node, i64 pid, bool rcu) {
    if (s.page_cached && rcu) return s.rcu.push_back({s.now + s.rcu_grace_ns, node, pid});
    rcu_callbacks(s);
    s.pool[node].push_back(pid);
}

inline void free_page_cache(State& s, i64 v, i64 node) {  // kvm_mmu_free_memory_caches()
    rcu_callbacks(s);
    auto& cache = s.v_pcache[v];
    for (auto it = cache.rbegin(); it != cache.rend(); ++it) s.pool[node].push_back(*it);
    cache.clear();
}

// --- VPIDs ----------------------------------------------------------------------------------
// The lowest free VPID (freed ones first: they are all below vpid_next), 0 if none.
inline i64 allocate_vpid(State& s) {
    if (!s.vpid_heap.empty()) {
        std::pop_heap(s.vpid_heap.begin(), s.vpid_heap.end(), std::greater<i64>());
        i64 vpid = s.vpid_heap.back();
        s.vpid_heap.pop_back();
        return vpid;
    }
    if (s.vpid_next < VMX_NR_VPIDS) return s.vpid_next++;
    s.vmc[VPID_EXHAUSTED]++;
    return 0;
}

inline void free_vpid(State& s, i64 vpid) {
    if (!vpid) return;
    s.vpid_heap.push_back(vpid);
    std::push_heap(s.vpid_heap.begin(), s.vpid_heap.end(), std::greater<i64>());
}

}  // namespace hv
