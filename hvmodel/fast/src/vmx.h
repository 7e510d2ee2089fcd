// hvmodel.vmx for the fast engine: VMCS tracking, the migration path, nested VMX.
// vmcs01 is VMCS 0 and vmcs02 VMCS 1; vmcs(v, w) is the pCPU VMCS w is active on, or -1.
#pragma once

#include "mmu.h"

namespace hv {

constexpr int VMCS01 = 0, VMCS02 = 1;

// smp_call_function_single(vmcs->cpu, __loaded_vmcs_clear, wait=1) unless local.
inline void loaded_vmcs_clear(State& s, i64 v, int w) {
    i64 cpu = s.vmcs(v, w);
    if (cpu == NONE) return;
    if (cpu != s.this_cpu) send_ipis(s, s.this_cpu, &cpu, 1, IPI_VMCLEAR, NO_FLUSH);
    s.vmcs(v, w) = NONE;
}

// D (and E, F): vmx_flush_ept_on_pcpu_migration() on the MMUs and slots D flushes, each valid
// root unless the strategy says this pCPU already flushed it; special roots always.
inline void flush_reachable_roots(State& s, i64 v, i64 cpu) {
    int last = s.prev_roots ? SLOTS : 1;
    for (int m = 0; m < 2; m++) {
        if (!(s.mmus & (1 << m))) continue;
        for (int k = 0; k < last; k++) {
            if (s.m_hpa[s.slot(v, m, k)] == NONE) continue;
            i64 r = s.m_sp[s.slot(v, m, k)];
            if (r == NONE || policy::needs_flush(s, r, cpu)) vmx_flush_tlb_ept_root(s, cpu, v, m, k);
        }
    }
}

// On a pCPU new to this VMCS: VMCLEAR it on the old one (an IPI in every strategy), then the
// strategy's decision. Returning to the same pCPU does nothing, even if other vCPUs ran there.
inline void vmx_vcpu_load_vmcs(State& s, i64 v, i64 cpu) {
    int w = int(s.v_lvmcs[v]);
    if (s.vmcs(v, w) == cpu) return;  // already_loaded
    if (s.vmcs(v, w) == NONE && s.owned[cpu]) s.c(VMCS_FIRST_LOADS, cpu)++;
    loaded_vmcs_clear(s, v, w);
    s.vmcs(v, w) = cpu;
    vmcs_load_new_cpu(s, cpu);
    s.fast(v, ROOT_MMU) = 0, s.fast(v, GUEST_MMU) = 0;
    int what = policy::vcpu_migrated(s, v, cpu);
    if (what & policy::MIGRATE_FLUSH_REACHABLE) flush_reachable_roots(s, v, cpu);
    if ((what & policy::MIGRATE_FLUSH_VM_ROOTS) && s.first_visit_global) invept_global(s, cpu);
    else if (what & policy::MIGRATE_FLUSH_VM_ROOTS)
        for (i64 r = s.vm_rhead[s.v_vm[v]]; r != NONE; r = s.r_next[r])
            if (!s.r_invalid[r]) invept_single(s, cpu, s.r_pid[r]);
    if (what & policy::MIGRATE_REQUEST_TLB_FLUSH) s.v_req[v] |= KVM_REQ_TLB_FLUSH;
}

inline void vmx_switch_vmcs(State& s, i64 v, int w) {
    if (s.v_lvmcs[v] == w) return;
    s.v_lvmcs[v] = w;
    vmx_vcpu_load_vmcs(s, v, s.v_cpu[v]);
}

inline void kvm_service_local_tlb_flush_requests(State& s, i64 v) {
    if (s.v_req[v] & KVM_REQ_TLB_FLUSH_CURRENT) flush_tlb_current(s, v);
    if (s.v_req[v] & KVM_REQ_TLB_FLUSH_GUEST) vmx_flush_tlb_guest(s, v);
    s.v_req[v] &= ~(KVM_REQ_TLB_FLUSH_CURRENT | KVM_REQ_TLB_FLUSH_GUEST);
}

// --- nested VMX ---------------------------------------------------------------------------
// VMLAUNCH/VMRESUME from L1: vmcs02 becomes current (its own migration check), then the MMU
// switches: guest_mmu on EPTP12 for nested EPT, else root_mmu with guest_mode=1.
inline void nested_vmx_enter_non_root_mode(State& s, i64 v, i64 l2, bool nested_ept, bool eptp_backed) {
    if (!s.v_vmxon[v]) {  // enter_vmx_operation(): vpid02 once, at L1's first VMXON
        s.v_vmxon[v] = 1;
        s.v_vpid02[v] = allocate_vpid(s);
    }
    kvm_service_local_tlb_flush_requests(s, v);  // pending flushes belong to L1's context
    vmx_switch_vmcs(s, v, VMCS02);
    s.v_gmode[v] = 1;
    if (nested_ept) {
        s.v_mmu[v] = GUEST_MMU;
        s.role(v, GUEST_MMU) = shadow_ept_role(s);
        s.v_eptp12[v] = l2, s.v_backed[v] = eptp_backed;
    } else {
        s.role(v, ROOT_MMU) = tdp_role(s, v);
    }
    kvm_mmu_new_pgd(s, v, l2);
    if (l2 != s.v_vpid12[v]) {  // nested_vmx_transition_tlb_flush()
        s.v_vpid12[v] = l2;
        s.v_req[v] |= KVM_REQ_TLB_FLUSH_GUEST;
    }
}

// Back to L1: vmcs01 and root_mmu with guest_mode = 0, reached through kvm_mmu_new_pgd(): the
// L1 root comes back from the cache without a flush.
inline void nested_vmx_vmexit(State& s, i64 v) {
    kvm_service_local_tlb_flush_requests(s, v);  // pending flushes belong to L2's context
    vmx_switch_vmcs(s, v, VMCS01);
    s.v_gmode[v] = 0;
    s.v_mmu[v] = ROOT_MMU;
    s.role(v, ROOT_MMU) = tdp_role(s, v);
    kvm_mmu_new_pgd(s, v, 0);
}

// L1 INVEPT: free the guest_mmu roots for EPTP12 (single-context) or all of them; the next use
// goes through kvm_mmu_load(), whose local flush covers this pCPU.
inline void handle_invept(State& s, i64 v, i64 eptp12) {
    i64 roots = 0;
    if (eptp12 == 0) {
        roots = KVM_MMU_ROOTS_ALL;
    } else {
        for (int k = 0; k < SLOTS; k++)
            if (s.m_hpa[s.slot(v, GUEST_MMU, k)] != NONE && s.m_pgd[s.slot(v, GUEST_MMU, k)] == eptp12) roots |= 1 << k;
    }
    if (roots) kvm_mmu_free_roots(s, s.v_vm[v], v, GUEST_MMU, roots);
}

}  // namespace hv
