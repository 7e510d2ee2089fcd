"""struct kvm, struct kvm_vcpu, and the x86.c paths the trace drives.

Each event handler is named after the kernel function it models. Handlers raise TraceError for
events that cannot happen (entering a vCPU that is not loaded, two vCPUs on one pCPU, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvmodel.kvm_host import (
    IN_GUEST_MODE,
    INVALID_PAGE,
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
    KVM_REQ_TLB_FLUSH,
    KVM_REQ_TLB_FLUSH_CURRENT,
    KVM_REQ_TLB_FLUSH_GUEST,
    OUTSIDE_GUEST_MODE,
    VALID_PAGE,
)
from hvmodel.kvm_main import hv_track_root_tdp, kvm_make_request
from hvmodel.mmu import (
    KvmMmu,
    kvm_calc_tdp_mmu_root_page_role,
    kvm_init_mmu,
    kvm_mmu_free_obsolete_roots,
    kvm_mmu_load,
    kvm_mmu_uninit_vm,
    kvm_mmu_unload,
    kvm_mmu_zap_all_fast,
    kvm_mmu_zap_leafs,
    kvm_mmu_zap_shadow_root,
)
from hvmodel.trace import PUT_PREEMPTED, ZAP_FLOOD, TraceError
from hvmodel.vmx import (
    LoadedVmcs,
    handle_invept,
    kvm_service_local_tlb_flush_requests,
    loaded_vmcs_clear,
    nested_vmx_enter_non_root_mode,
    nested_vmx_vmexit,
    vmx_flush_tlb_all,
    vmx_vcpu_load_vmcs,
)

if TYPE_CHECKING:
    from hvmodel.host import Host


class KvmVcpuArch:
    """vcpu->arch: the three MMUs and which one is in use."""

    __slots__ = ("root_mmu", "guest_mmu", "nested_mmu", "mmu")

    def __init__(self) -> None:
        self.root_mmu = KvmMmu("root_mmu", None)
        self.guest_mmu = KvmMmu("guest_mmu", None)
        # nested_mmu only walks L2's stage-1 tables; it never holds an EPTP, so no flush path
        # ever looks at it (flushing it would be waste, hazard H5's other half).
        self.nested_mmu = KvmMmu("nested_mmu", None)
        self.mmu = self.root_mmu


class KvmVcpu:
    """struct kvm_vcpu + struct vcpu_vmx (the parts that matter for TLB maintenance)."""

    __slots__ = (
        "kvm",
        "vcpu_idx",
        "cpu",
        "mode",
        "requests",
        "arch",
        "guest_mode",
        "smm",
        "vmcs01",
        "vmcs02",
        "loaded_vmcs",
        "vpid",
        "vpid02",
        "last_vpid12",
        "nested_eptp12",
        "nested_eptp12_backed",
        "hv_root_tdp",
        "loaded",
        "nested_vmxon",
        "need_resched",
        "preempted_ns",
    )

    def __init__(self, kvm: Kvm, idx: int):
        self.kvm, self.vcpu_idx = kvm, idx
        self.cpu = -1  # vcpu->cpu: the pCPU it last loaded on
        self.loaded = False  # between vcpu_load and vcpu_put
        self.need_resched = False  # TIF_NEED_RESCHED on its thread (Ev.NEED_RESCHED)
        self.preempted_ns = -1  # vcpu->preempted: put while runnable, at this time (steal_ns)
        self.mode = OUTSIDE_GUEST_MODE
        self.requests = 0
        self.arch = KvmVcpuArch()
        self.guest_mode = False  # is_guest_mode(): running L2
        self.smm = False
        self.vmcs01, self.vmcs02 = LoadedVmcs("vmcs01"), LoadedVmcs("vmcs02")
        self.loaded_vmcs = self.vmcs01
        self.vpid = kvm.host.vpids.allocate_vpid(kvm.host)
        self.vpid02 = 0
        self.nested_vmxon = False  # L1 has executed VMXON (vpid02 allocated, or not available)
        self.last_vpid12 = 0
        self.nested_eptp12, self.nested_eptp12_backed = 0, True
        self.hv_root_tdp = INVALID_PAGE  # hv_track_root_tdp()
        self.arch.root_mmu.root_role = kvm_calc_tdp_mmu_root_page_role(self)

    def __repr__(self) -> str:
        return f"<vcpu {self.kvm.id}/{self.vcpu_idx} cpu={self.cpu}>"


class Kvm:
    """struct kvm: vCPUs, the TDP MMU root list, the shadow page hash, mmu_valid_gen."""

    def __init__(self, host: Host, vm_id: int, nr_vcpus: int, tdp_level: int, node: int):
        self.host, self.id, self.tdp_level, self.node = host, vm_id, tdp_level, node
        self.created_ns = host.now  # for vcpu_ns
        self.roots: dict = {}  # every live root page of this VM, by id (1, 2, ... within the VM)
        self.next_root_id = 0
        self.tdp_mmu_roots: list = []
        self.mmu_page_hash: dict = {}  # (gfn, role) -> shadow page
        self.mmu_valid_gen = 0
        self.hv_root_tdp = INVALID_PAGE  # kvm->arch.hv_root_tdp: the common root, if any
        self.vcpus = [KvmVcpu(self, i) for i in range(nr_vcpus)]


# --- VM lifecycle -------------------------------------------------------------------------
def kvm_create_vm(host: Host, vm_id: int, nr_vcpus: int, tdp_level: int, node: int) -> Kvm:
    if vm_id in host.vms:
        raise TraceError(f"vm_create: VM {vm_id} already exists")
    if not 0 <= node < host.topo.numa_nodes:
        raise TraceError(f"vm_create: node {node} does not exist (host has {host.topo.numa_nodes})")
    kvm = host.vms[vm_id] = Kvm(host, vm_id, nr_vcpus, tdp_level, node)
    host.strategy.vm_created(kvm)
    # kvm_arch_vcpu_create(): vcpu_load(); ... kvm_init_mmu(); vcpu_put(). The VMCS becomes
    # active on the VMM's pCPU, a VMCS load like any other; the vCPU does not run there, so the
    # pCPU it last ran on (vcpu.cpu) is left alone.
    for vcpu in kvm.vcpus:
        vmx_vcpu_load_vmcs(vcpu, host.this_cpu)
    return kvm


def kvm_destroy_vm(kvm: Kvm) -> None:
    """Runs on a VMM thread (host.this_cpu): every vCPU must be put. vmx_vcpu_free() ->
    nested_vmx_free_vcpu() loads each vCPU here (vmx_leave_nested() back to vmcs01), then each
    VMCS is freed (VMCLEARed where it is active: an IPI unless local), roots are dropped."""
    host = kvm.host
    for vcpu in kvm.vcpus:
        if vcpu.loaded:
            raise TraceError(f"vm_destroy: vCPU {vcpu.vcpu_idx} of VM {kvm.id} is still loaded; vcpu_put it first")
    host.metrics.vm["vcpu_ns"] += len(kvm.vcpus) * (host.now - kvm.created_ns)
    for vcpu in kvm.vcpus:
        end_steal(vcpu)
        vmx_vcpu_load_vmcs(vcpu, host.this_cpu)  # nested_vmx_free_vcpu(): vcpu_load(), as at creation
        if vcpu.loaded_vmcs is vcpu.vmcs02:  # vmx_leave_nested() -> nested_vmx_vmexit()
            vcpu.loaded_vmcs = vcpu.vmcs01
            vmx_vcpu_load_vmcs(vcpu, host.this_cpu)
        loaded_vmcs_clear(host, vcpu.vmcs01)
        loaded_vmcs_clear(host, vcpu.vmcs02)
        kvm_mmu_unload(vcpu)
        host.pool.free_cache(vcpu, kvm.node, host.now)
        host.vpids.free_vpid(vcpu.vpid)
        host.vpids.free_vpid(vcpu.vpid02)
    kvm_mmu_uninit_vm(kvm)
    host.strategy.vm_destroyed(kvm)
    del host.vms[kvm.id]


# --- scheduling ---------------------------------------------------------------------------
def kvm_arch_vcpu_load(vcpu: KvmVcpu, cpu: int) -> None:
    host = vcpu.kvm.host
    if vcpu.loaded:
        raise TraceError(f"vcpu_load: {vcpu!r} is already loaded; vcpu_put it first")
    other = host.running[cpu]
    if other is not None:
        raise TraceError(f"vcpu_load: pCPU {cpu} is running {other!r}")
    if vcpu.cpu not in (-1, cpu) and host.owned[cpu]:
        host.metrics.cpu["pcpu_changes"][cpu] += 1
    end_steal(vcpu)
    vcpu.cpu, vcpu.loaded = cpu, True
    host.running[cpu] = vcpu
    vmx_vcpu_load_vmcs(vcpu, cpu)


def kvm_sched_out(vcpu: KvmVcpu, reason: int) -> None:
    """The vCPU thread leaves its pCPU: kvm_sched_out() (or vcpu_put()) -> kvm_arch_vcpu_put().
    `reason` (trace.PUT_REASONS) only feeds the trace's rates: halts, preemptions, steal."""
    kvm_arch_vcpu_put(vcpu)
    host = vcpu.kvm.host
    if reason == PUT_PREEMPTED:
        vcpu.preempted_ns = host.now
    if host.owned[vcpu.cpu] and reason:
        host.metrics.cpu["preemptions" if reason == PUT_PREEMPTED else "halts"][vcpu.cpu] += 1


def end_steal(vcpu: KvmVcpu) -> None:
    """A preempted vCPU runs again (or its VM goes): the wait since its preemption is steal,
    counted on the pCPU it was preempted on."""
    host = vcpu.kvm.host
    if vcpu.preempted_ns >= 0:
        if host.owned[vcpu.cpu]:
            host.metrics.cpu["steal_ns"][vcpu.cpu] += host.now - vcpu.preempted_ns
        vcpu.preempted_ns = -1


def kvm_arch_vcpu_put(vcpu: KvmVcpu) -> None:
    _require_loaded(vcpu, "vcpu_put")
    vcpu_leave_guest(vcpu)
    vcpu.loaded = vcpu.need_resched = False
    vcpu.kvm.host.running[vcpu.cpu] = None


def vcpu_leave_guest(vcpu: KvmVcpu) -> None:
    """A VM exit that returns to the host (HLT, I/O, ...): the vCPU stays loaded."""
    if vcpu.mode == IN_GUEST_MODE:
        vcpu.kvm.host.leave_guest(vcpu)


def _require_loaded(vcpu: KvmVcpu, what: str) -> None:
    if not vcpu.loaded:
        raise TraceError(f"{what}: {vcpu!r} is not loaded on any pCPU (vcpu_load it first)")


# --- entering the guest ---------------------------------------------------------------------
def vcpu_enter_guest(vcpu: KvmVcpu) -> None:
    """Service requests in kernel order, kvm_mmu_reload(), then enter: the oracle checks the
    pCPU's cached translations for the active EP4TA before the guest can use them."""
    _require_loaded(vcpu, "vm_entry")
    host = vcpu.kvm.host
    host.this_cpu = vcpu.cpu
    vcpu.need_resched = False
    if vcpu.requests:
        if vcpu.requests & KVM_REQ_MMU_FREE_OBSOLETE_ROOTS:
            kvm_mmu_free_obsolete_roots(vcpu)
        if vcpu.requests & KVM_REQ_TLB_FLUSH:  # kvm_vcpu_flush_tlb_all(); also covers CURRENT
            vmx_flush_tlb_all(vcpu)
            vcpu.requests &= ~KVM_REQ_TLB_FLUSH_CURRENT
        kvm_service_local_tlb_flush_requests(vcpu)
        vcpu.requests = 0
    mmu = vcpu.arch.mmu
    if not VALID_PAGE(mmu.root.hpa):  # kvm_mmu_reload()
        kvm_mmu_load(vcpu)
    hv_track_root_tdp(vcpu, mmu.root.hpa)  # vmx_load_mmu_pgd()
    host.tlb_enter(vcpu.cpu, vcpu, mmu.root)
    host.enter_guest(vcpu)


# --- mode changes that reset or switch the MMU --------------------------------------------
def kvm_mmu_reset_context(vcpu: KvmVcpu) -> None:
    """kvm_mmu_unload() + kvm_init_mmu(): SMM transitions, CR0/CR4/EFER role bits, CPUID."""
    kvm_mmu_unload(vcpu)
    kvm_init_mmu(vcpu)


def kvm_smm_changed(vcpu: KvmVcpu, entering: bool) -> None:
    if vcpu.smm == entering:
        raise TraceError(f"smm_{'enter' if entering else 'exit'}: {vcpu!r} is {'already' if entering else 'not'} in SMM")
    if entering and vcpu.guest_mode:  # vmx_enter_smm(): SMM forces L2 out first
        nested_vmx_vmexit(vcpu)
    vcpu.smm = entering
    kvm_mmu_reset_context(vcpu)


def kvm_zap_gfn_range(kvm: Kvm, arg: int) -> None:
    if arg & ZAP_FLOOD:
        kvm_mmu_zap_shadow_root(kvm, arg & ~ZAP_FLOOD)
    else:
        kvm_mmu_zap_leafs(kvm, arg)


def kvm_arch_flush_shadow_memslot(kvm: Kvm) -> None:
    kvm_mmu_zap_all_fast(kvm)


# --- event dispatch -----------------------------------------------------------------------
def vcpu_event(host: Host, vm: int, vcpu_idx: int, what: str) -> KvmVcpu:
    kvm = host.vms.get(vm)
    if kvm is None:
        raise TraceError(f"{what}: VM {vm} does not exist")
    if not 0 <= vcpu_idx < len(kvm.vcpus):
        raise TraceError(f"{what}: VM {vm} has no vCPU {vcpu_idx} (it has {len(kvm.vcpus)})")
    return kvm.vcpus[vcpu_idx]


def run_in_vcpu_context(vcpu: KvmVcpu, what: str) -> None:
    """Mode transitions happen in a VM exit handler on the vCPU's pCPU."""
    _require_loaded(vcpu, what)
    vcpu_leave_guest(vcpu)
    vcpu.kvm.host.this_cpu = vcpu.cpu


def nested_vmenter(vcpu: KvmVcpu, l2: int, nested_ept: bool, eptp_backed: bool) -> None:
    if vcpu.guest_mode:
        raise TraceError(f"nested_vmenter: {vcpu!r} is already running L2")
    if vcpu.smm:
        raise TraceError(f"nested_vmenter: {vcpu!r} is in SMM")
    nested_vmx_enter_non_root_mode(vcpu, l2, nested_ept, eptp_backed)


def nested_vmexit(vcpu: KvmVcpu) -> None:
    if not vcpu.guest_mode:
        raise TraceError(f"nested_vmexit: {vcpu!r} is not running L2")
    nested_vmx_vmexit(vcpu)


def l1_invept(vcpu: KvmVcpu, eptp12: int) -> None:
    if vcpu.guest_mode:
        raise TraceError(f"l1_invept: {vcpu!r} is running L2; INVEPT is executed by L1")
    handle_invept(vcpu, eptp12)


def need_resched(vcpu: KvmVcpu) -> None:
    """The scheduler wants the vCPU's thread off its pCPU. Nothing happens until the vCPU is
    kicked out of guest mode: vcpu_run() -> kvm_xfer_to_guest_mode_handle_work() then calls
    schedule() instead of re-entering (Engine.finish_event), so the requests the kick delivered
    wait for the vCPU's next entry, wherever that is. Cleared when it is put or enters."""
    _require_loaded(vcpu, "need_resched")
    vcpu.need_resched = True


def guest_tlb_flush(vcpu: KvmVcpu) -> None:
    kvm_make_request(KVM_REQ_TLB_FLUSH_GUEST, vcpu)
