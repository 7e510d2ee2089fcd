"""arch/x86/kvm/vmx/{vmx.c,nested.c}: VMCS tracking, VPIDs, the flush handlers, nested VMX.

Migration is per loaded VMCS: vmcs01 and vmcs02 each remember the pCPU they are active on, so a
vCPU that moves while in L1 is "migrated" again for vmcs02 at its next nested VM-enter.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import numpy as np

from hvmodel.kvm_host import (
    DUMMY_ROOT_HPA,
    KVM_MMU_NUM_PREV_ROOTS,
    KVM_MMU_ROOT_CURRENT,
    KVM_MMU_ROOT_PREVIOUS,
    KVM_MMU_ROOTS_ALL,
    KVM_REQ_TLB_FLUSH_CURRENT,
    KVM_REQ_TLB_FLUSH_GUEST,
    VALID_PAGE,
    VMX_NR_VPIDS,
)
from hvmodel.kvm_main import kvm_make_request
from hvmodel.mmu import (
    kvm_calc_shadow_ept_root_page_role,
    kvm_calc_tdp_mmu_root_page_role,
    kvm_mmu_free_roots,
    kvm_mmu_new_pgd,
)

if TYPE_CHECKING:
    from hvmodel.host import Host
    from hvmodel.kvm import KvmVcpu


class VpidBitmap:
    """vmx_vpid_bitmap: 16-bit VPIDs, 0 reserved ("no VPID"); allocate_vpid() takes the lowest
    free one (find_first_zero_bit). On exhaustion it returns 0 and the vCPU runs without a
    VPID (hardware then flushes linear and combined mappings on every VM entry and exit)."""

    def __init__(self, nr: int = VMX_NR_VPIDS):
        self.nr = nr
        self.free: list[int] = []  # heap of freed VPIDs, all below `next`
        self.next = 1

    def allocate_vpid(self, host: Host) -> int:
        if self.free:
            return heapq.heappop(self.free)
        if self.next < self.nr:
            self.next += 1
            return self.next - 1
        host.metrics.vm["vpid_exhausted"] += 1
        return 0

    def free_vpid(self, vpid: int) -> None:
        if vpid:
            heapq.heappush(self.free, vpid)


class LoadedVmcs:
    """struct loaded_vmcs: `cpu` is the pCPU the VMCS is active on, -1 after VMCLEAR."""

    __slots__ = ("name", "cpu")

    def __init__(self, name: str):
        self.name = name
        self.cpu = -1


# --- VMCS load / migration ----------------------------------------------------------------
def loaded_vmcs_clear(host: Host, vmcs: LoadedVmcs) -> None:
    """smp_call_function_single(vmcs->cpu, __loaded_vmcs_clear, wait=1) unless local."""
    if vmcs.cpu != -1:
        if vmcs.cpu != host.this_cpu:
            host.send_ipis(host.this_cpu, np.array([vmcs.cpu]), "ipi_vmclear")
        vmcs.cpu = -1


def vmx_vcpu_load_vmcs(vcpu: KvmVcpu, cpu: int) -> None:
    """On a pCPU new to this VMCS: VMCLEAR it on the old one (an IPI in every strategy), then
    let the strategy make the new pCPU safe. Upstream raises KVM_REQ_TLB_FLUSH: "the new pCPU
    may have stale TLB entries from its previous association with the vCPU"."""
    host = vcpu.kvm.host
    vmcs = vcpu.loaded_vmcs
    if vmcs.cpu == cpu:  # already_loaded: nothing, even if other vCPUs ran here meanwhile
        return
    if vmcs.cpu == -1 and host.owned[cpu]:
        host.metrics.cpu["vmcs_first_loads"][cpu] += 1
    loaded_vmcs_clear(host, vmcs)
    vmcs.cpu = cpu
    host.vmcs_load_new_cpu(cpu)
    vcpu.arch.root_mmu.root_via_fast_switch = False
    vcpu.arch.guest_mmu.root_via_fast_switch = False
    host.strategy.vcpu_migrated(vcpu, cpu)


def vmx_switch_vmcs(vcpu: KvmVcpu, vmcs: LoadedVmcs) -> None:
    if vcpu.loaded_vmcs is vmcs:
        return
    vcpu.loaded_vmcs = vmcs
    vmx_vcpu_load_vmcs(vcpu, vcpu.cpu)


# --- flush handlers -----------------------------------------------------------------------
def vmx_flush_tlb_ept_root(host: Host, cpu: int, root) -> None:
    """INVEPT single-context on root.hpa. construct_eptp() takes level and A/D bits from the
    root's shadow page; the dummy root, which has none, gets hpa|WB|PWL4
    (kvm_mmu_is_dummy_root()), so it too is flushed single-context. With EPT the dummy root is
    the only root without a shadow page, so the ept_sync_global() fallback is unreachable."""
    assert root.sp is not None or root.hpa == DUMMY_ROOT_HPA, root
    host.invept_single(cpu, root.hpa)


def vmx_flush_tlb_current(vcpu: KvmVcpu) -> None:
    root = vcpu.arch.mmu.root
    if VALID_PAGE(root.hpa):
        vmx_flush_tlb_ept_root(vcpu.kvm.host, vcpu.cpu, root)


def vmx_flush_tlb_all(vcpu: KvmVcpu) -> None:
    """KVM_REQ_TLB_FLUSH with EPT: ept_sync_global(), unconditionally."""
    vcpu.kvm.host.invept_global(vcpu.cpu)


def vmx_flush_tlb_guest(vcpu: KvmVcpu) -> None:
    """KVM_REQ_TLB_FLUSH_GUEST: INVVPID single on the current VPID (vmx_get_current_vpid(): in
    L2, nested_get_vpid02(), which falls back to L1's vpid when no vpid02 could be allocated)."""
    vpid = (vcpu.vpid02 or vcpu.vpid) if vcpu.guest_mode else vcpu.vpid
    if vpid:
        vcpu.kvm.host.invvpid(vcpu.cpu)


def kvm_service_local_tlb_flush_requests(vcpu: KvmVcpu) -> None:
    """x86.c: KVM_REQ_TLB_FLUSH_CURRENT and KVM_REQ_TLB_FLUSH_GUEST, for the current context.
    (Here rather than in kvm.py because nested.c calls it too.)"""
    if vcpu.requests & KVM_REQ_TLB_FLUSH_CURRENT:
        vcpu.kvm.host.strategy.flush_tlb_current(vcpu)
    if vcpu.requests & KVM_REQ_TLB_FLUSH_GUEST:
        vmx_flush_tlb_guest(vcpu)
    vcpu.requests &= ~(KVM_REQ_TLB_FLUSH_CURRENT | KVM_REQ_TLB_FLUSH_GUEST)


# --- nested VMX ---------------------------------------------------------------------------
def nested_vmx_transition_tlb_flush(vcpu: KvmVcpu, vpid12: int) -> None:
    """On VM-enter. L1 enables VPID for its L2s (vpid12 = the L2's id): with EPT on, L1 and L2
    never share an EP4TA, so only a change of vpid12 needs KVM_REQ_TLB_FLUSH_GUEST (and
    nothing is needed on VM-exit, L1 having its own VPID)."""
    if vpid12 != vcpu.last_vpid12:
        vcpu.last_vpid12 = vpid12
        kvm_make_request(KVM_REQ_TLB_FLUSH_GUEST, vcpu)


def nested_vmx_enter_non_root_mode(vcpu: KvmVcpu, l2: int, nested_ept: bool, eptp_backed: bool) -> None:
    """VMLAUNCH/VMRESUME from L1: vmcs02 becomes current (its own migration check), then the
    MMU switches: guest_mmu on EPTP12 for nested EPT, else root_mmu with guest_mode=1."""
    host = vcpu.kvm.host
    if not vcpu.nested_vmxon:  # enter_vmx_operation(): vpid02 once, at L1's first VMXON
        vcpu.nested_vmxon = True
        vcpu.vpid02 = host.vpids.allocate_vpid(host)
    kvm_service_local_tlb_flush_requests(vcpu)  # pending flushes belong to L1's context
    vmx_switch_vmcs(vcpu, vcpu.vmcs02)
    vcpu.guest_mode = True
    if nested_ept:  # nested_ept_init_mmu_context + kvm_init_shadow_ept_mmu
        vcpu.arch.mmu = vcpu.arch.guest_mmu
        vcpu.arch.guest_mmu.root_role = kvm_calc_shadow_ept_root_page_role(vcpu)
        vcpu.nested_eptp12, vcpu.nested_eptp12_backed = l2, eptp_backed
        kvm_mmu_new_pgd(vcpu, l2)
    else:  # nested_vmx_load_cr3 + kvm_init_mmu: a TDP root with role.guest_mode = 1
        vcpu.arch.root_mmu.root_role = kvm_calc_tdp_mmu_root_page_role(vcpu)
        kvm_mmu_new_pgd(vcpu, l2)
    nested_vmx_transition_tlb_flush(vcpu, l2)


def nested_vmx_vmexit(vcpu: KvmVcpu) -> None:
    """Back to L1: vmcs01 (its own migration check) and root_mmu with guest_mode = 0, reached
    through kvm_mmu_new_pgd(): the L1 root comes back from the cache without a flush."""
    kvm_service_local_tlb_flush_requests(vcpu)  # pending flushes belong to L2's context
    vmx_switch_vmcs(vcpu, vcpu.vmcs01)
    vcpu.guest_mode = False
    vcpu.arch.mmu = vcpu.arch.root_mmu
    vcpu.arch.root_mmu.root_role = kvm_calc_tdp_mmu_root_page_role(vcpu)
    kvm_mmu_new_pgd(vcpu, 0)


def handle_invept(vcpu: KvmVcpu, eptp12: int) -> None:
    """L1 INVEPT: free the guest_mmu roots for EPTP12 (single-context) or all of them; the
    next use goes through kvm_mmu_load(), whose local flush covers this pCPU."""
    mmu = vcpu.arch.guest_mmu
    if eptp12 == 0:
        roots = KVM_MMU_ROOTS_ALL
    else:
        roots = KVM_MMU_ROOT_CURRENT if VALID_PAGE(mmu.root.hpa) and mmu.root.pgd == eptp12 else 0
        for i in range(KVM_MMU_NUM_PREV_ROOTS):
            if VALID_PAGE(mmu.prev_roots[i].hpa) and mmu.prev_roots[i].pgd == eptp12:
                roots |= KVM_MMU_ROOT_PREVIOUS(i)
    if roots:
        kvm_mmu_free_roots(vcpu.kvm, mmu, roots)
