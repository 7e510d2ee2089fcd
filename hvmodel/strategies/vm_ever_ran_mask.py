"""C — per-VM mask of pCPUs the VM has ever run on (Vitaly Kuznetsov, 87tt2nm6ie.fsf@redhat.com,
Aug 2025), proposed to complement B on huge partitioned / RT hosts.

B with the broadcast scoped: on root allocation, flush the root only on the VM's ever-ran mask
(IPIs to the other pCPUs in it). When a vCPU lands on a pCPU not yet in the mask: add it and
flush there. The mail's "+ a flush when a new one is added to it" does not say which flush:
every valid root of the VM single-context (`first_visit_flush=per_root`, the default) or one
INVEPT all-context (`first_visit_flush=global`). As in B, the flush at the end of kvm_mmu_load()
is gone [inferred: C only changes B's scope], and the migration flush has B's two readings:
kept (`vm_ever_ran_mask`, B's diff as posted) or elided (`vm_ever_ran_mask_elide`, the intent
B's comment states and the mail builds C on). Remote flushes are unchanged.
Memory: one cpumask per VM.
"""

import numpy as np

from hvmodel.errors import ConfigError
from hvmodel.strategies.ipi_all_on_alloc import IpiAllOnAlloc

FIRST_VISIT_FLUSHES = ("per_root", "global")


class VmEverRanMask(IpiAllOnAlloc):
    name = "vm_ever_ran_mask"
    fast_code = 2  # hvmodel/fast/src/policy.h
    on_each_cpu = False  # B's broadcast scoped to the VM's own pCPUs

    def __init__(self, mask_sizing: str = "nr_cpu_ids", elide_migration_flush: bool = False, first_visit_flush: str = "per_root"):
        super().__init__(mask_sizing, elide_migration_flush)
        if first_visit_flush not in FIRST_VISIT_FLUSHES:
            raise ConfigError("strategy.first_visit_flush", f"unknown {first_visit_flush!r}; allowed: {', '.join(FIRST_VISIT_FLUSHES)}")
        self.first_visit_flush = first_visit_flush
        self.ever_ran: dict[int, set[int]] = {}  # VM id -> pCPUs

    def vm_created(self, kvm):
        self.ever_ran[kvm.id] = set()
        self.host.metrics.mask_alloc(self.mask_bytes)

    def vm_destroyed(self, kvm):
        del self.ever_ran[kvm.id]
        self.host.metrics.mask_free(self.mask_bytes)

    def vcpu_migrated(self, vcpu, cpu):
        mask = self.ever_ran[vcpu.kvm.id]
        if cpu not in mask:
            mask.add(cpu)
            if self.first_visit_flush == "global":
                self.host.invept_global(cpu)
            else:
                for sp in list(vcpu.kvm.roots.values()):
                    if not sp.invalid:
                        self.host.invept_single(cpu, sp.hpa)
        super().vcpu_migrated(vcpu, cpu)

    def root_allocated(self, vcpu, sp):
        self.flush_root_on(vcpu.cpu, np.array(sorted(self.ever_ran[vcpu.kvm.id]), np.int64), sp)
