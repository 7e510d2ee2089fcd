"""virt/kvm/kvm_main.c and the remote-flush paths: requests, kicks, kvm_flush_remote_tlbs.

Kept below mmu.py and vmx.py (both call kvm_flush_remote_tlbs) so imports point one way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvmodel.kvm_host import IN_GUEST_MODE, KVM_REQ_TLB_FLUSH, VALID_PAGE

if TYPE_CHECKING:
    from hvmodel.kvm import Kvm, KvmVcpu


def kvm_make_request(req: int, vcpu: KvmVcpu) -> None:
    vcpu.requests |= req


def kvm_make_all_cpus_request(kvm: Kvm, req: int) -> None:
    """Set `req` on every vCPU; IPI (and wait for) only the pCPUs whose vCPU is in guest mode.

    The handler (ack_flush) is empty: the IPI only forces the VM exit, and each vCPU services
    the request in vcpu_enter_guest on whatever pCPU it next enters. pCPUs that merely used to
    run this VM are not touched (kvm-flush-semantics.md §3.7).
    """
    host = kvm.host
    targets = []
    for vcpu in kvm.vcpus:
        vcpu.requests |= req
        if vcpu.mode == IN_GUEST_MODE:
            targets.append(vcpu.cpu)
    host.send_ipis(host.this_cpu, targets, "ipi_flush")


def kvm_flush_remote_tlbs(kvm: Kvm) -> None:
    """kvm_flush_remote_tlbs(): the strategy may add to it (mask clearing, generations)."""
    kvm.host.metrics.vm["remote_flushes"] += 1
    kvm.host.strategy.flush_remote_tlbs(kvm)


def kvm_arch_flush_remote_tlbs(kvm: Kvm) -> None:
    """The environment's default: hv_flush_remote_tlbs() when nested on Hyper-V, else requests."""
    if kvm.host.env == "hyperv":
        hv_flush_remote_tlbs(kvm)
    else:
        kvm.host.oracle.note_remote_flush(kvm)
        kvm_make_all_cpus_request(kvm, KVM_REQ_TLB_FLUSH)


def hv_flush_remote_tlbs(kvm: Kvm) -> None:
    """One HvCallFlushGuestPhysicalAddressSpace per distinct vcpu->arch.hv_root_tdp.

    hv_track_root_tdp() records the root a vCPU last loaded into EPT_POINTER; roots cached
    only in prev_roots are not flushed here (as in arch/x86/kvm/kvm_onhyperv.c).
    """
    host = kvm.host
    roots = sorted({v.hv_root_tdp for v in kvm.vcpus if VALID_PAGE(v.hv_root_tdp)})
    host.oracle.note_remote_flush(kvm, set(roots))
    for hpa in roots:
        host.hv_flush_guest_physical_address_space(host.this_cpu, hpa)
