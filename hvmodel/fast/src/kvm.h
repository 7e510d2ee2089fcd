// hvmodel.kvm and the engine's dispatch, for the fast engine: VM lifecycle, scheduling,
// vcpu_enter_guest, mode changes, and one event at a time in the context it runs in.
//
// An event that cannot happen sets s.err (an ERR_* code; s.err_args hold what the message
// names) before it changes anything the reference would not have changed, and replay stops:
// engine.py turns it into the reference's TraceError text.
#pragma once

#include "vmx.h"

namespace hv {

inline void fail(State& s, int code, i64 a, i64 b = 0, i64 c = 0, i64 d = 0) {
    s.err = code;
    s.err_args[0] = a, s.err_args[1] = b, s.err_args[2] = c, s.err_args[3] = d;
}

// --- VM lifecycle -------------------------------------------------------------------------
inline i64 new_vm_slot(State& s) {
    if (!s.vm_free.empty()) {
        i64 vm = s.vm_free.back();
        s.vm_free.pop_back();
        return vm;
    }
    size_t vm = s.vm_ext.size(), n = vm + 1;
    for (auto* a : {&s.vm_ext, &s.vm_nvcpus, &s.vm_vcpu0, &s.vm_level, &s.vm_node, &s.vm_vgen, &s.vm_hv_root,
                    &s.vm_next_rid, &s.vm_rhead, &s.vm_rtail, &s.vm_thead, &s.vm_ttail, &s.vm_hhead, &s.vm_htail,
                    &s.vm_row, &s.vm_created})
        a->resize(n, NONE);
    return i64(vm);
}

// n contiguous vCPU slots: a freed block of that size, else new ones.
inline i64 new_vcpu_block(State& s, i64 n) {
    if (0 < n && n <= KVM_MAX_VCPUS && s.vblock_free[n] != NONE) {
        i64 v0 = s.vblock_free[n];
        s.vblock_free[n] = s.v_next_free[v0];
        return v0;
    }
    i64 v0 = s.v_used;
    s.v_used += n;
    size_t u = size_t(s.v_used);
    for (auto* a : {&s.v_mcache, &s.v_vm, &s.v_idx, &s.v_cpu, &s.v_mode, &s.v_req, &s.v_lvmcs, &s.v_vpid, &s.v_vpid02, &s.v_vpid12,
                    &s.v_eptp12, &s.v_hv_root, &s.v_mmu, &s.v_next_free, &s.v_preempted})
        grow(*a, u);
    for (auto* a : {&s.v_loaded, &s.v_gmode, &s.v_smm, &s.v_vmxon, &s.v_backed, &s.v_resched}) grow(*a, u);
    grow(s.v_pcache, u);
    grow(s.v_vmcs, 2 * u), grow(s.m_role, 2 * u), grow(s.m_fast, 2 * u);
    grow(s.m_pgd, 2 * SLOTS * u), grow(s.m_hpa, 2 * SLOTS * u), grow(s.m_sp, 2 * SLOTS * u);
    return v0;
}

inline void free_vcpu_block(State& s, i64 v0, i64 n) {
    if (0 < n && n <= KVM_MAX_VCPUS) {
        s.v_next_free[v0] = s.vblock_free[n];
        s.vblock_free[n] = v0;
    }
}

// struct kvm_vcpu as kvm_vm_ioctl_create_vcpu leaves it (KvmVcpu.__init__).
inline void init_vcpu(State& s, i64 v, i64 vm, i64 idx) {
    s.v_vm[v] = vm, s.v_idx[v] = idx, s.v_cpu[v] = NONE, s.v_loaded[v] = 0, s.v_mode[v] = OUTSIDE_GUEST_MODE;
    s.v_resched[v] = 0, s.v_mcache[v] = 0, s.v_preempted[v] = NONE;
    s.v_pcache[v].clear();
    s.v_req[v] = 0, s.v_gmode[v] = 0, s.v_smm[v] = 0, s.v_lvmcs[v] = VMCS01;
    s.vmcs(v, VMCS01) = NONE, s.vmcs(v, VMCS02) = NONE;
    s.v_vpid[v] = allocate_vpid(s);
    s.v_vpid02[v] = 0, s.v_vmxon[v] = 0, s.v_vpid12[v] = 0, s.v_eptp12[v] = 0, s.v_backed[v] = 1;
    s.v_hv_root[v] = NONE, s.v_mmu[v] = ROOT_MMU;
    for (int m = 0; m < 2; m++) {
        s.fast(v, m) = 0, s.role(v, m) = 0;
        for (int k = 0; k < SLOTS; k++) set_slot(s, v, m, k, 0, NONE, NONE);
    }
    s.role(v, ROOT_MMU) = tdp_role(s, v);
}

inline void kvm_create_vm(State& s, i64 vm_id, i64 nr_vcpus, i64 tdp_level, i64 node) {
    if (map_get(s, vm_id) != NONE) return fail(s, ERR_VM_EXISTS, vm_id);
    if (!(0 <= node && node < s.n_nodes)) return fail(s, ERR_NO_NODE, node, s.n_nodes);
    i64 vm = new_vm_slot(s);
    map_put(s, vm_id, vm);
    s.vm_ext[vm] = vm_id, s.vm_nvcpus[vm] = nr_vcpus, s.vm_level[vm] = tdp_level, s.vm_node[vm] = node;
    s.vm_vgen[vm] = 0, s.vm_hv_root[vm] = NONE, s.vm_next_rid[vm] = 0, s.vm_row[vm] = NONE, s.vm_created[vm] = s.now;
    s.vm_rhead[vm] = s.vm_rtail[vm] = s.vm_thead[vm] = s.vm_ttail[vm] = s.vm_hhead[vm] = s.vm_htail[vm] = NONE;
    i64 v0 = s.vm_vcpu0[vm] = new_vcpu_block(s, nr_vcpus);
    for (i64 i = 0; i < nr_vcpus; i++) init_vcpu(s, v0 + i, vm, i);
    policy::vm_created(s, vm);
    for (i64 v = v0; v < v0 + nr_vcpus; v++) vmx_vcpu_load_vmcs(s, v, s.this_cpu);  // kvm_arch_vcpu_create(): vcpu_load()
}

// A preempted vCPU runs again (or its VM goes): the wait since its preemption is steal, counted
// on the pCPU it was preempted on (kvm.end_steal).
inline void end_steal(State& s, i64 v) {
    if (s.v_preempted[v] == NONE) return;
    if (s.owned[s.v_cpu[v]]) s.c(STEAL_NS, s.v_cpu[v]) += s.now - s.v_preempted[v];
    s.v_preempted[v] = NONE;
}

// Runs on a VMM thread (this_cpu): every vCPU must be put. nested_vmx_free_vcpu() loads each vCPU
// here (vmx_leave_nested() back to vmcs01); each VMCS is then VMCLEARed where it is active (an IPI
// unless local), roots are dropped and freed.
inline void kvm_destroy_vm(State& s, i64 vm) {
    i64 v0 = s.vm_vcpu0[vm], n = s.vm_nvcpus[vm];
    for (i64 v = v0; v < v0 + n; v++)
        if (s.v_loaded[v]) return fail(s, ERR_DESTROY_LOADED, s.v_idx[v], s.vm_ext[vm]);
    s.vmc[VCPU_NS] += n * (s.now - s.vm_created[vm]);
    for (i64 v = v0; v < v0 + n; v++) {
        end_steal(s, v);
        vmx_vcpu_load_vmcs(s, v, s.this_cpu);
        if (s.v_lvmcs[v] == VMCS02) s.v_lvmcs[v] = VMCS01, vmx_vcpu_load_vmcs(s, v, s.this_cpu);
        loaded_vmcs_clear(s, v, VMCS01);
        loaded_vmcs_clear(s, v, VMCS02);
        kvm_mmu_unload(s, v);
        free_page_cache(s, v, s.vm_node[vm]);
        free_vpid(s, s.v_vpid[v]);
        free_vpid(s, s.v_vpid02[v]);
    }
    kvm_mmu_zap_all_fast(s, vm);  // kvm_mmu_uninit_vm()
    if (s.vm_rhead[vm] != NONE) return fail(s, ERR_ROOTS_LEAKED, s.vm_ext[vm]);
    policy::vm_destroyed(s, vm);
    map_del(s, s.vm_ext[vm]);
    s.vm_free.push_back(vm);
    free_vcpu_block(s, v0, n);
}

// --- scheduling ---------------------------------------------------------------------------
inline void kvm_arch_vcpu_load(State& s, i64 v, i64 cpu) {
    if (s.v_loaded[v]) return fail(s, ERR_ALREADY_LOADED, v);
    if (s.running[cpu] != NONE) return fail(s, ERR_PCPU_BUSY, cpu, s.running[cpu]);
    if (s.v_cpu[v] != NONE && s.v_cpu[v] != cpu && s.owned[cpu]) s.c(PCPU_CHANGES, cpu)++;
    end_steal(s, v);
    s.v_cpu[v] = cpu, s.v_loaded[v] = 1;
    s.running[cpu] = v;
    vmx_vcpu_load_vmcs(s, v, cpu);
}

inline void kvm_arch_vcpu_put(State& s, i64 v) {
    if (!s.v_loaded[v]) return fail(s, ERR_NOT_LOADED, v, VCPU_PUT);
    if (s.v_mode[v] == IN_GUEST_MODE) leave_guest(s, v);
    s.v_loaded[v] = 0, s.v_resched[v] = 0;
    s.running[s.v_cpu[v]] = NONE;
}

// kvm_sched_out() -> kvm_arch_vcpu_put(); `reason` (PUT_REASONS) only feeds the trace's rates.
inline void kvm_sched_out(State& s, i64 v, i64 reason) {
    kvm_arch_vcpu_put(s, v);
    if (s.err) return;
    if (reason == PUT_PREEMPTED) s.v_preempted[v] = s.now;
    if (s.owned[s.v_cpu[v]] && reason) s.c(reason == PUT_PREEMPTED ? PREEMPTIONS : HALTS, s.v_cpu[v])++;
}

// Host.close_accounting: guest mode, steal and vCPU lifetimes still open run to end_ns.
inline void close_accounting(State& s, i64 end_ns) {
    for (i64 cpu = 0; cpu < s.n_cpus; cpu++)
        if (s.in_guest[cpu] != NONE && s.owned[cpu]) s.c(GUEST_NS, cpu) += end_ns - s.guest_since[cpu];
    for (size_t i = 0; i < s.map_keys.size(); i++) {
        if (s.map_keys[i] < 0) continue;
        i64 vm = s.map_vals[i], v0 = s.vm_vcpu0[vm], n = s.vm_nvcpus[vm];
        s.vmc[VCPU_NS] += n * (end_ns - s.vm_created[vm]);
        for (i64 v = v0; v < v0 + n; v++)
            if (s.v_preempted[v] != NONE && s.owned[s.v_cpu[v]]) s.c(STEAL_NS, s.v_cpu[v]) += end_ns - s.v_preempted[v];
    }
}

// Service requests in kernel order, kvm_mmu_reload(), then enter: the oracle checks the pCPU's
// cached translations for the active EP4TA before the guest can use them.
inline void vcpu_enter_guest(State& s, i64 v) {
    s.this_cpu = s.v_cpu[v];
    s.v_resched[v] = 0;
    if (s.v_req[v]) {
        if (s.v_req[v] & KVM_REQ_MMU_FREE_OBSOLETE_ROOTS) kvm_mmu_free_obsolete_roots(s, v);
        if (s.v_req[v] & KVM_REQ_TLB_FLUSH) {  // kvm_vcpu_flush_tlb_all(); also covers CURRENT
            vmx_flush_tlb_all(s, v);
            s.v_req[v] &= ~KVM_REQ_TLB_FLUSH_CURRENT;
        }
        kvm_service_local_tlb_flush_requests(s, v);
        s.v_req[v] = 0;
    }
    int m = int(s.v_mmu[v]);
    if (s.m_hpa[s.slot(v, m, 0)] == NONE) kvm_mmu_load(s, v);  // kvm_mmu_reload()
    hv_track_root_tdp(s, v, s.m_hpa[s.slot(v, m, 0)]);         // vmx_load_mmu_pgd()
    tlb_enter(s, s.v_cpu[v], v, s.m_sp[s.slot(v, m, 0)]);
    enter_guest(s, v);
}

// kvm_mmu_unload() + kvm_init_mmu(): SMM transitions, CR0/CR4/EFER role bits, CPUID.
inline void kvm_mmu_reset_context(State& s, i64 v) {
    kvm_mmu_unload(s, v);
    kvm_init_mmu(s, v);
}

inline void kvm_smm_changed(State& s, i64 v, bool entering) {
    if (bool(s.v_smm[v]) == entering) return fail(s, entering ? ERR_SMM_ENTER : ERR_SMM_EXIT, v);
    if (entering && s.v_gmode[v]) nested_vmx_vmexit(s, v);  // vmx_enter_smm(): SMM forces L2 out first
    s.v_smm[v] = entering;
    kvm_mmu_reset_context(s, v);
}

// --- one event ------------------------------------------------------------------------------
// The vCPU slot an event names, or -1 (and s.err).
inline i64 vcpu_event(State& s, i64 vm_id, i64 idx, int kind) {
    i64 vm = map_get(s, vm_id);
    if (vm == NONE) return fail(s, ERR_NO_VM, kind, vm_id), NONE;
    if (!(0 <= idx && idx < s.vm_nvcpus[vm])) return fail(s, ERR_NO_VCPU, kind, vm_id, idx, s.vm_nvcpus[vm]), NONE;
    return s.vm_vcpu0[vm] + idx;
}

// The host code of this event runs on cpu; a VMM or kernel thread cannot run where a vCPU is in
// guest mode (a vCPU thread being scheduled in is checked by kvm_arch_vcpu_load()).
inline bool on_cpu(State& s, i64 cpu, bool vcpu_thread) {
    if (!(0 <= cpu && cpu < s.n_cpus)) return fail(s, ERR_NO_PCPU, cpu, s.n_cpus), false;
    if (!vcpu_thread && s.in_guest[cpu] != NONE) return fail(s, ERR_HOST_ON_GUEST_CPU, cpu, s.in_guest[cpu]), false;
    s.this_cpu = cpu;
    return true;
}

// Mode transitions, handled in a VM exit on the vCPU's pCPU.
inline void in_vcpu_context(State& s, i64 v, int kind, i64 arg) {
    switch (kind) {
        case SMM_ENTER: return kvm_smm_changed(s, v, true);
        case SMM_EXIT: return kvm_smm_changed(s, v, false);
        case NESTED_VMENTER:
            if (s.v_gmode[v]) return fail(s, ERR_NESTED_IN_L2, v);
            if (s.v_smm[v]) return fail(s, ERR_NESTED_IN_SMM, v);
            return nested_vmx_enter_non_root_mode(s, v, arg & 0xFFFFFFFF, !(arg & NESTED_NO_EPT), !(arg & NESTED_EPTP_NOT_BACKED));
        case NESTED_VMEXIT:
            if (!s.v_gmode[v]) return fail(s, ERR_NOT_IN_L2, v);
            return nested_vmx_vmexit(s, v);
        case L1_INVEPT:
            if (s.v_gmode[v]) return fail(s, ERR_INVEPT_IN_L2, v);
            return handle_invept(s, v, arg);
        case MMU_RESET_CONTEXT: return kvm_mmu_reset_context(s, v);
        case GUEST_TLB_FLUSH: s.v_req[v] |= KVM_REQ_TLB_FLUSH_GUEST; return;
        default: return;  // VM_EXIT: leaving guest mode is all there is
    }
}

// Engine.dispatch: route one event to the kernel path it drives, in the context it runs in.
inline void dispatch(State& s, int kind, i64 vm_id, i64 idx, i64 cpu, i64 arg) {
    i64 v, vm;
    switch (kind) {
        case VM_EXIT: case SMM_ENTER: case SMM_EXIT: case NESTED_VMENTER: case NESTED_VMEXIT: case L1_INVEPT:
        case MMU_RESET_CONTEXT: case GUEST_TLB_FLUSH:
            if ((v = vcpu_event(s, vm_id, idx, kind)) == NONE) return;
            if (!s.v_loaded[v]) return fail(s, ERR_NOT_LOADED, v, kind);  // run_in_vcpu_context()
            if (s.v_mode[v] == IN_GUEST_MODE) leave_guest(s, v);
            s.this_cpu = s.v_cpu[v];
            return in_vcpu_context(s, v, kind, arg);
        case VM_DESTROY: case ZAP: case MEMSLOT_DELETE:  // a VMM or kernel thread on the event's pCPU
            if (!on_cpu(s, cpu, false)) return;
            if ((vm = map_get(s, vm_id)) == NONE) return fail(s, ERR_NO_VM, kind, vm_id);
            if (kind == VM_DESTROY) return kvm_destroy_vm(s, vm);
            if (kind == ZAP && (arg & ZAP_FLOOD)) return kvm_mmu_zap_shadow_root(s, vm, arg & ~ZAP_FLOOD);
            if (kind == ZAP) return kvm_mmu_zap_leafs(s, vm, arg);
            return kvm_mmu_zap_all_fast(s, vm);
        case VM_CREATE:
            if (!on_cpu(s, cpu, false)) return;
            return kvm_create_vm(s, vm_id, arg & 0xFFFF, (arg >> 16) & 0xFF, arg >> 24);
        case VCPU_LOAD:
            if (!on_cpu(s, cpu, true) || (v = vcpu_event(s, vm_id, idx, kind)) == NONE) return;
            return kvm_arch_vcpu_load(s, v, cpu);
        case VCPU_PUT:
            if ((v = vcpu_event(s, vm_id, idx, kind)) == NONE) return;
            return kvm_sched_out(s, v, arg);
        case VM_ENTRY:
            if ((v = vcpu_event(s, vm_id, idx, kind)) == NONE) return;
            if (!s.v_loaded[v]) return fail(s, ERR_NOT_LOADED, v, kind);
            return vcpu_enter_guest(s, v);
        case NEED_RESCHED:  // the scheduler, not the vCPU: it stays in guest mode until kicked
            if ((v = vcpu_event(s, vm_id, idx, kind)) == NONE) return;
            if (!s.v_loaded[v]) return fail(s, ERR_NOT_LOADED, v, kind);
            s.v_resched[v] = 1;
            return;
        default: return fail(s, ERR_UNKNOWN_KIND, kind);
    }
}

// vCPUs kicked out of guest mode by this event's IPIs re-enter, servicing whatever was requested
// of them, except those whose thread must reschedule first (need_resched: they stay out until
// their next event); then each pCPU's interruption becomes one noise sample.
inline void finish_event(State& s, i64 t_ns) {
    for (; s.re_head < s.reentry.size(); s.re_head++) {
        i64 v = s.reentry[s.re_head];
        if (s.v_loaded[v] && s.v_mode[v] == OUTSIDE_GUEST_MODE && !s.v_resched[v]) vcpu_enter_guest(s, v);
    }
    s.reentry.clear(), s.re_head = 0;
    close_irqs(s, t_ns);
}

}  // namespace hv
