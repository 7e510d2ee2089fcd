// F: per-root generations; flushed_gen as a row of generation + 1 per pCPU (0: never flushed)
// (strategies/root_generation.py).
#pragma once

#include "../metrics.h"

namespace hv::root_generation {

inline void root_created(State& s, i64 r) {
    s.r_gen[r] = 0;
    s.r_row[r] = s.gens.alloc();
    mask_alloc(s, s.table_bytes);
}

inline void root_freed(State& s, i64 r) {
    s.gens.release(s.r_row[r]);
    mask_free(s, s.table_bytes);
}

inline bool needs_flush(State& s, i64 r, i64 cpu) {
    u32* row = s.gen_row(s.r_row[r]);
    u32 gen = u32(s.r_gen[r] + 1);
    if (row[cpu] == gen) return false;
    row[cpu] = gen;
    return true;
}

inline void bump(State& s, i64 vm) {
    for (i64 r = s.vm_rhead[vm]; r != NONE; r = s.r_next[r]) s.r_gen[r]++;
}

}  // namespace hv::root_generation
