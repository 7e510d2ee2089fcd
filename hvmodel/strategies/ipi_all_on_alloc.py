"""B — kvm_mmu_flush_all_tlbs_root() (Sean Christopherson, Jul 2025, aHWjPSIdp5B-2UBl@google.com;
dropped in aJE9x_pjBVIdiEJN after Vitaly's RT objection, 87tt2nm6ie.fsf@redhat.com).

When a root is allocated (a fresh TDP root, or a shadow page whose root_count goes 0 -> 1),
on_each_cpu(kvm_flush_tlb_root): an IPI to every other online CPU and a single-context INVEPT
on each (and locally). The sketch deletes the flush at the end of kvm_mmu_load(). Remote
flushes are unchanged.

The migration flush has two readings. The diff touches only mmu.c, mmu_internal.h and
tdp_mmu.c: there is no vmx.c hunk, so vmx_vcpu_load_vmcs() still raises KVM_REQ_TLB_FLUSH on
a new pCPU (`ipi_all_on_alloc`, the default). The comment it deletes the kvm_mmu_load() flush
with says why: "flushing TLBs on all CPUs allows KVM to elide TLB flushes when a vCPU is
migrated"; that stated intent, not yet written, is `elide_migration_flush=True`
(`ipi_all_on_alloc_elide`).
"""

from hvmodel.strategies.base import KernelDefaults


class IpiAllOnAlloc(KernelDefaults):
    name = "ipi_all_on_alloc"
    fast_code = 1  # hvmodel/fast/src/policy.h
    on_each_cpu = True  # a broadcast to every online pCPU, beyond the VM's own

    def __init__(self, mask_sizing: str = "nr_cpu_ids", elide_migration_flush: bool = False):
        super().__init__(mask_sizing)
        self.elide_migration_flush = bool(elide_migration_flush)
        if self.elide_migration_flush:
            self.name = f"{type(self).name}_elide"

    def vcpu_migrated(self, vcpu, cpu):
        if not self.elide_migration_flush:
            super().vcpu_migrated(vcpu, cpu)  # vmx.c as posted: KVM_REQ_TLB_FLUSH

    def kvm_mmu_load_flush(self, vcpu):
        pass  # moved to allocation

    def root_allocated(self, vcpu, sp):
        self.flush_root_on(vcpu.cpu, self.host.online_cpus, sp)

    def flush_root_on(self, this_cpu, cpus, sp):
        """on_each_cpu()/on_each_cpu_mask() with kvm_flush_tlb_root: run it locally if this CPU
        is in the (sorted) set, IPI the rest."""
        host = self.host
        if this_cpu in cpus:
            host.invept_single(this_cpu, sp.hpa)
        host.send_ipis(this_cpu, cpus, "ipi_flush", flush_hpa=sp.hpa)
