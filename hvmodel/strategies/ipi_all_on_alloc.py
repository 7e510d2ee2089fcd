"""B — kvm_mmu_flush_all_tlbs_root() (Sean Christopherson, Jul 2025, aHWjPSIdp5B-2UBl@google.com;
dropped in aJE9x_pjBVIdiEJN after Vitaly's RT objection, 87tt2nm6ie.fsf@redhat.com).

When a root is allocated (a fresh TDP root, or a shadow page whose root_count goes 0 -> 1),
on_each_cpu(kvm_flush_tlb_root): an IPI to every other online CPU and a single-context INVEPT
on each, so that nothing needs flushing on migration. Remote flushes are unchanged.
"""

from hvmodel.strategies.base import KernelDefaults


class IpiAllOnAlloc(KernelDefaults):
    name = "ipi_all_on_alloc"

    def vcpu_migrated(self, vcpu, cpu):
        pass

    def root_allocated(self, vcpu, sp):
        host = self.host
        host.invept_single(vcpu.cpu, sp.hpa)  # on_each_cpu runs the function locally too
        host.send_ipis(vcpu.cpu, host.online_cpus, "ipi_flush", lambda cpu: host.invept_single(cpu, sp.hpa))
