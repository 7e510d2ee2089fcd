// C: the per-VM ever-ran mask as a cpumask row per VM (strategies/vm_ever_ran_mask.py).
#pragma once

#include "../metrics.h"

namespace hv::vm_ever_ran_mask {

inline void vm_created(State& s, i64 vm) {
    s.vm_row[vm] = s.rows.alloc();
    mask_alloc(s, s.mask_bytes);
}

inline void vm_destroyed(State& s, i64 vm) {
    s.rows.release(s.vm_row[vm]);
    mask_free(s, s.mask_bytes);
}

// On migration: whether cpu is new to the VM (and add it); then every valid root is flushed there.
inline bool first_visit(State& s, i64 v, i64 cpu) {
    u64* row = s.row(s.vm_row[s.v_vm[v]]);
    if (bit_test(row, cpu)) return false;
    bit_set(row, cpu);
    return true;
}

}  // namespace hv::vm_ever_ran_mask
