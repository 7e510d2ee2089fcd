"""virt/kvm/kvm_main.c and the remote-flush paths: requests, kicks, kvm_flush_remote_tlbs.

Kept below mmu.py and vmx.py (both call kvm_flush_remote_tlbs) so imports point one way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hvmodel.kvm_host import IN_GUEST_MODE, INVALID_PAGE, KVM_REQ_TLB_FLUSH, VALID_PAGE

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
    host.send_ipis(host.this_cpu, np.unique(np.array(targets, np.int64)), "ipi_flush")


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


def hv_track_root_tdp(vcpu: KvmVcpu, root_hpa: int) -> None:
    """vmx_load_mmu_pgd(): remember the root this vCPU runs on; a VM-wide common root stays
    cached only while every vCPU loads that same root."""
    kvm = vcpu.kvm
    vcpu.hv_root_tdp = root_hpa
    if root_hpa != kvm.hv_root_tdp:
        kvm.hv_root_tdp = INVALID_PAGE


def hv_flush_remote_tlbs(kvm: Kvm) -> None:
    """HvCallFlushGuestPhysicalAddressSpace for the cached common root, or else for each
    vCPU's hv_root_tdp in vCPU order, skipping only repeats of the first one (as
    arch/x86/kvm/kvm_onhyperv.c does). Roots a vCPU holds only in prev_roots are not flushed."""
    host = kvm.host
    if VALID_PAGE(kvm.hv_root_tdp):
        roots = [kvm.hv_root_tdp]
    else:
        roots = []
        for vcpu in kvm.vcpus:
            root = vcpu.hv_root_tdp
            if VALID_PAGE(root) and root != kvm.hv_root_tdp:
                if not roots:
                    kvm.hv_root_tdp = root
                roots.append(root)
        if len(roots) > 1:
            kvm.hv_root_tdp = INVALID_PAGE
    host.oracle.note_remote_flush(kvm, set(roots))
    for hpa in roots:
        host.hv_flush_guest_physical_address_space(host.this_cpu, hpa)
