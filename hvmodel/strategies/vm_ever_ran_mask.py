"""C — per-VM mask of pCPUs the VM has ever run on (Vitaly Kuznetsov, 87tt2nm6ie.fsf@redhat.com,
Aug 2025), complementing B for huge partitioned / RT hosts.

On root allocation, IPI only the VM's ever-ran mask (INVEPT single there) instead of every CPU.
When a vCPU lands on a pCPU that is not yet in the mask: add it and flush, on that pCPU, every
valid root of the VM (single-context). Remote flushes are unchanged. Memory: one cpumask per VM.
"""

from hvmodel.strategies.base import KernelDefaults


class VmEverRanMask(KernelDefaults):
    name = "vm_ever_ran_mask"

    def __init__(self, mask_sizing: str = "nr_cpu_ids"):
        super().__init__(mask_sizing)
        self.ever_ran: dict[int, set[int]] = {}  # VM id -> pCPUs

    def vm_created(self, kvm):
        self.ever_ran[kvm.id] = set()
        self.host.metrics.mask_alloc(self.mask_bytes)

    def vm_destroyed(self, kvm):
        del self.ever_ran[kvm.id]
        self.host.metrics.mask_free(self.mask_bytes)

    def vcpu_migrated(self, vcpu, cpu):
        mask = self.ever_ran[vcpu.kvm.id]
        if cpu in mask:
            return
        mask.add(cpu)
        for sp in list(vcpu.kvm.roots.values()):
            if not sp.invalid:
                self.host.invept_single(cpu, sp.hpa)

    def root_allocated(self, vcpu, sp):
        host = self.host
        mask = self.ever_ran[vcpu.kvm.id]
        if vcpu.cpu in mask:
            host.invept_single(vcpu.cpu, sp.hpa)
        host.send_ipis(vcpu.cpu, mask, "ipi_flush", lambda cpu: host.invept_single(cpu, sp.hpa))
