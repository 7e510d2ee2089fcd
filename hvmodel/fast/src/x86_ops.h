// The TLB callbacks of kvm_x86_ops for VMX (vmx.c), as the strategy sets them: the flushes that
// kvm_mmu_load(), the request handlers and the migration path carry out.
#pragma once

#include "host.h"
#include "policy.h"

namespace hv {

// INVEPT single-context on slot k of vCPU v's MMU m. The dummy root, which has no shadow page
// (with EPT the only such root), is flushed single-context too.
inline void vmx_flush_tlb_ept_root(State& s, i64 cpu, i64 v, int m, int k) {
    i64 r = s.m_sp[s.slot(v, m, k)];
    invept_single(s, cpu, r == NONE ? NONE : s.r_pid[r]);
}

// kvm_x86_call(flush_tlb_current): INVEPT single on the current root, this pCPU only; H turns
// it into the Hyper-V broadcast hypercall for the root.
inline void flush_tlb_current(State& s, i64 v) {
    int m = int(s.v_mmu[v]);
    i64 hpa = s.m_hpa[s.slot(v, m, 0)];
    if (hpa == NONE) return;
    if (policy::flush_tlb_current_is_hypercall(s)) hv_flush_guest_physical_address_space(s, s.v_cpu[v], hpa);
    else vmx_flush_tlb_ept_root(s, s.v_cpu[v], v, m, 0);
}

// KVM_REQ_TLB_FLUSH with EPT: ept_sync_global(), unconditionally.
inline void vmx_flush_tlb_all(State& s, i64 v) { invept_global(s, s.v_cpu[v]); }

// KVM_REQ_TLB_FLUSH_GUEST: INVVPID single on the current VPID (in L2 nested_get_vpid02(), which
// falls back to L1's vpid when no vpid02 could be allocated).
inline void vmx_flush_tlb_guest(State& s, i64 v) {
    if ((s.v_gmode[v] && s.v_vpid02[v]) || s.v_vpid[v]) invvpid(s, s.v_cpu[v]);
}

}  // namespace hv
