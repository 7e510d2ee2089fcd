// The strategies, for the fast engine: what each one changes in KVM, as in its reference class.
//
// A strategy decides; the kernel-path headers carry out. Each reference class names its code
// (`fast_code` in hvmodel/strategies/*.py); this table says, per code, which hooks differ from
// KernelDefaults, and calls the strategy's own functions (strategies/*.h) for the state it
// keeps: cpumasks, generations. engine.py refuses a class whose hooks differ from the class
// that names its code: there is no compiled version of it, and it never guesses.
#pragma once

#include "strategies/per_root_cpumask.h"
#include "strategies/root_generation.h"
#include "strategies/vm_ever_ran_mask.h"

namespace hv::policy {

enum Code { UPSTREAM, IPI_ALL_ON_ALLOC, VM_EVER_RAN_MASK, ACTIVE_ROOTS, PER_ROOT_CPUMASK, PER_ROOT_CPUMASK_CLEAR,
            ROOT_GENERATION, HYPERV_FLUSH_HYPERCALL };

// vcpu_migrated: what vmx_vcpu_load_vmcs() does on a pCPU new to the VMCS (flags: C as posted
// flushes the VM's roots and still requests the flush)
enum Migrate { MIGRATE_NOTHING = 0, MIGRATE_REQUEST_TLB_FLUSH = 1, MIGRATE_FLUSH_REACHABLE = 2, MIGRATE_FLUSH_VM_ROOTS = 4 };
// root_allocated: which pCPUs flush a new root (on_each_cpu / on_each_cpu_mask)
enum Alloc { ALLOC_NOTHING, ALLOC_FLUSH_ALL, ALLOC_FLUSH_EVER_RAN };

inline int vcpu_migrated(State& s, i64 v, i64 cpu) {
    int request = s.elide_migration_flush ? MIGRATE_NOTHING : MIGRATE_REQUEST_TLB_FLUSH;  // B and C's readings
    switch (s.policy) {
        case UPSTREAM: return MIGRATE_REQUEST_TLB_FLUSH;
        case IPI_ALL_ON_ALLOC: return request;
        case HYPERV_FLUSH_HYPERCALL: return MIGRATE_NOTHING;
        case VM_EVER_RAN_MASK: return (vm_ever_ran_mask::first_visit(s, v, cpu) ? MIGRATE_FLUSH_VM_ROOTS : 0) | request;
        default: return MIGRATE_FLUSH_REACHABLE;
    }
}

inline bool needs_flush(State& s, i64 r, i64 cpu) {
    switch (s.policy) {
        case PER_ROOT_CPUMASK: case PER_ROOT_CPUMASK_CLEAR: return per_root_cpumask::needs_flush(s, r, cpu);
        case ROOT_GENERATION: return root_generation::needs_flush(s, r, cpu);
        default: return true;
    }
}

// E and E' (per_root_cpumask_clear only adds to the remote flush)
inline bool per_root_mask(const State& s) { return s.policy == PER_ROOT_CPUMASK || s.policy == PER_ROOT_CPUMASK_CLEAR; }

inline void root_created(State& s, i64 v, i64 r) {
    if (per_root_mask(s)) per_root_cpumask::root_created(s, v, r);
    else if (s.policy == ROOT_GENERATION) root_generation::root_created(s, r);
}

inline void mmu_topup_memory_caches(State& s, i64 v) {
    if (per_root_mask(s)) per_root_cpumask::mmu_topup_memory_caches(s, v);
}

inline void root_referenced(State& s, i64 r) {
    if (per_root_mask(s)) per_root_cpumask::root_referenced(s, r);
}

inline void root_freed(State& s, i64 r) {
    if (per_root_mask(s)) per_root_cpumask::root_freed(s, r);
    else if (s.policy == ROOT_GENERATION) root_generation::root_freed(s, r);
}

inline Alloc root_allocated(const State& s) {
    if (s.policy == IPI_ALL_ON_ALLOC) return ALLOC_FLUSH_ALL;
    if (s.policy == VM_EVER_RAN_MASK) return ALLOC_FLUSH_EVER_RAN;
    return ALLOC_NOTHING;
}

// Whether kvm_mmu_load() ends with flush_tlb_current (B and C move it to allocation).
inline bool kvm_mmu_load_flushes(const State& s) { return s.policy != IPI_ALL_ON_ALLOC && s.policy != VM_EVER_RAN_MASK; }

inline bool flush_tlb_current_is_hypercall(const State& s) { return s.policy == HYPERV_FLUSH_HYPERCALL; }

// What a strategy adds to kvm_flush_remote_tlbs() before the kernel's own flush.
inline void flush_remote_tlbs(State& s, i64 vm) {
    if (s.policy == PER_ROOT_CPUMASK_CLEAR) per_root_cpumask::clear_masks(s, vm);
    else if (s.policy == ROOT_GENERATION) root_generation::bump(s, vm);
}

inline void vm_created(State& s, i64 vm) {
    if (s.policy == VM_EVER_RAN_MASK) vm_ever_ran_mask::vm_created(s, vm);
}

inline void vm_destroyed(State& s, i64 vm) {
    if (s.policy == VM_EVER_RAN_MASK) vm_ever_ran_mask::vm_destroyed(s, vm);
    if (per_root_mask(s)) per_root_cpumask::vm_destroyed(s, vm);
}

}  // namespace hv::policy
