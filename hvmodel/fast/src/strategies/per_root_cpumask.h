// E, E': per-root cpu_flushed_mask as a cpumask row per root (strategies/per_root_cpumask.py).
#pragma once

#include "../metrics.h"

namespace hv::per_root_cpumask {

inline void root_created(State& s, i64 r) {
    s.r_row[r] = s.rows.alloc();
    mask_alloc(s, s.mask_bytes);
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
