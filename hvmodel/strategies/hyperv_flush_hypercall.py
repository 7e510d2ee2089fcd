"""H — "KVM: VMX: Tweak TLB flushing when VMX is running on Hyper-V" (Jeremi Piotrowski, RFC,
Jun 2025, 4266fc8f76c152a3ffcbb2d2ebafd608aa0fb949.1750432368.git.jpiotrowski@linux.microsoft.com;
rejected in aHWjPSIdp5B-2UBl for special-casing one host).

Nested on Hyper-V only: flush_tlb_current (kvm_mmu_load, KVM_REQ_TLB_FLUSH_CURRENT) becomes
the broadcast HvCallFlushGuestPhysicalAddressSpace for the root, so no flush is needed on
migration. Remote flushes already use the hypercall on Hyper-V.
"""

from hvmodel.kvm_host import VALID_PAGE
from hvmodel.strategies.base import KernelDefaults


class HypervFlushHypercall(KernelDefaults):
    name = "hyperv_flush_hypercall"
    fast_code = 7  # hvmodel/fast/src/policy.h
    environments = ("hyperv",)

    def vcpu_migrated(self, vcpu, cpu):
        pass

    def flush_tlb_current(self, vcpu):
        root = vcpu.arch.mmu.root
        if VALID_PAGE(root.hpa):
            self.host.hv_flush_guest_physical_address_space(vcpu.cpu, root.hpa)
