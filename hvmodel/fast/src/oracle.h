// hvmodel.oracle for the fast engine: classify a stale use, and mark the entries a remote flush
// cannot reach. It observes; it never fixes state.
#pragma once

#include "metrics.h"

namespace hv {

inline i64 page_hpa(const State& s, i64 pid) {
    i64 node = pid % s.n_nodes, pfn = pid / s.n_nodes;
    return ((node << 36) | pfn) << PAGE_SHIFT;
}

inline i64 tlb_find(const State& s, i64 cpu, i64 pid) {
    const i64* row = &s.tlb_pid[cpu * s.tlb_w];
    for (i64 k = 0; k < s.tlb_n[cpu]; k++)
        if (row[k] == pid) return k;
    return NONE;
}

// Every kind that applies, as bits (Hazard order); H2 only if no other does.
inline int classify(State& s, i64 v, i64 r, i64 e) {
    int m = int(s.v_mmu[v]);
    int kinds = (s.tlb_serial[e] != s.r_serial[r]) << H1 | s.tlb_missed[e] << H4 | (s.fast(v, m) != 0) << H3 |
                (m == GUEST_MMU) << H5;
    return kinds ? kinds : 1 << H2;
}

// Oracle.stale_use: TLB entry e (an index into the tlb_* arrays) of `cpu` is stale for root r,
// which vCPU v enters.
inline void stale_use(State& s, i64 cpu, i64 v, i64 r, i64 e) {
    int kinds = classify(s, v, r, e), kind = __builtin_ctz(kinds);  // the first rule that matches
    i64 ex[N_EX] = {s.now, cpu, s.vm_ext[s.v_vm[v]], s.v_idx[v], kind, s.v_mmu[v], s.r_id[r], page_hpa(s, s.r_pid[r]),
                    s.r_epoch[r], s.tlb_rid[e], s.tlb_vmid[e], s.tlb_epoch[e]};
    stale(s, cpu, kinds, ex);
}

inline bool contains(const i64* a, i64 n, i64 x) {
    for (i64 i = 0; i < n; i++)
        if (a[i] == x) return true;
    return false;
}

// Before a remote flush of VM vm, mark the cached entries it cannot reach (H4). Bare metal
// (n_flushed < 0): entries on pCPUs where no vCPU of the VM has a VMCS loaded. Hyper-V:
// entries of roots other than the hpas flushed[0..n_flushed), on every pCPU.
inline void note_remote_flush(State& s, i64 vm, const i64* flushed, i64 n_flushed) {
    s.mark_now++;
    for (i64 v = s.vm_vcpu0[vm]; v < s.vm_vcpu0[vm] + s.vm_nvcpus[vm]; v++)
        for (int w = 0; w < 2; w++)
            if (s.vmcs(v, w) >= 0) s.mark[s.vmcs(v, w)] = s.mark_now;
    i64* cpus = s.scratch.data();
    for (i64 r = s.vm_rhead[vm]; r != NONE; r = s.r_next[r]) {
        i64 pid = s.r_pid[r];
        if (n_flushed >= 0 && contains(flushed, n_flushed, page_hpa(s, pid))) continue;
        i64 n = bits_to_list(s.holder_row(pid), s.words, cpus);
        for (i64 j = 0; j < n; j++) {
            i64 cpu = cpus[j];
            if (n_flushed >= 0 || s.mark[cpu] != s.mark_now) {
                i64 e = cpu * s.tlb_w + tlb_find(s, cpu, pid);
                if (s.tlb_serial[e] == s.r_serial[r]) s.tlb_missed[e] = 1;
            }
        }
    }
}

}  // namespace hv
