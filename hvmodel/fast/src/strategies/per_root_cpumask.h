// E, E': per-root cpu_flushed_mask as a cpumask row per root (strategies/per_root_cpumask.py).
#pragma once

#include "../metrics.h"

namespace hv::per_root_cpumask {

// mask_source=memory_cache: kvm_mmu_load() tops the vCPU's cache up when it is empty
inline void mmu_topup_memory_caches(State& s, i64 v) {
    if (!s.mask_cache || s.v_mcache[v] >= 1) return;
    mask_alloc(s, (KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE - s.v_mcache[v]) * s.mask_bytes);
    s.v_mcache[v] = KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE;
}

inline void root_created(State& s, i64 v, i64 r) {
    s.r_row[r] = s.rows.alloc();
    if (s.mask_cache) s.v_mcache[v]--;  // from the vCPU's cache: already counted
    else mask_alloc(s, s.mask_bytes);
}

// mask_lifetime=reference: alloc_root_cpu_mask() after every ++sp->root_count of a shadow root
inline void root_referenced(State& s, i64 r) {
    if (s.mask_reset_on_reference) std::fill_n(s.row(s.r_row[r]), s.words, u64(0));
}

inline void vm_destroyed(State& s, i64 vm) {  // kvm_mmu_free_memory_caches()
    for (i64 v = s.vm_vcpu0[vm]; v < s.vm_vcpu0[vm] + s.vm_nvcpus[vm]; v++) {
        mask_free(s, s.v_mcache[v] * s.mask_bytes);
        s.v_mcache[v] = 0;
    }
}

inline void root_freed(State& s, i64 r) {
    s.rows.release(s.r_row[r]);
    mask_free(s, s.mask_bytes);
}

// test, then set (review aKT_0Zuj2MBRrh6p)
inline bool needs_flush(State& s, i64 r, i64 cpu) {
    u64* row = s.row(s.r_row[r]);
    if (bit_test(row, cpu)) return false;
    bit_set(row, cpu);
    return true;
}

// E': clear the masks of the VM's roots on every remote flush
inline void clear_masks(State& s, i64 vm) {
    for (i64 r = s.vm_rhead[vm]; r != NONE; r = s.r_next[r]) std::fill_n(s.row(s.r_row[r]), s.words, u64(0));
}

}  // namespace hv::per_root_cpumask
