"""F — per-root flush generations (variant; Sean, 2021: track "when that pCPU last flushed";
compare SVM's per-pCPU ASID generation in pre_svm_run()).

Each root has a generation, bumped by every remote flush of its VM; each (root, pCPU) remembers
the generation it last flushed at. On migration, flush a reachable root unless this pCPU
already flushed it at the current generation. Memory: a u32 per (root, pCPU), allocated as a
per-root array of nr_cpu_ids entries.
"""

from hvmodel.strategies.base import NR_CPUS, KernelDefaults, kmalloc_size, reachable_roots
from hvmodel.vmx import vmx_flush_tlb_ept_root


class RootGeneration(KernelDefaults):
    name = "root_generation"

    def __init__(self, mask_sizing: str = "nr_cpu_ids"):
        super().__init__(mask_sizing)
        self.gen: dict[int, int] = {}  # root id -> generation
        self.flushed_gen: dict[int, dict[int, int]] = {}  # root id -> {pCPU: generation}

    @property
    def table_bytes(self) -> int:
        cpus = self.host.topo.nr_cpus if self.mask_sizing == "nr_cpu_ids" else NR_CPUS
        return kmalloc_size(4 * cpus)

    def root_created(self, sp):
        self.gen[sp.id] = 0
        self.flushed_gen[sp.id] = {}
        self.host.metrics.mask_alloc(self.table_bytes)

    def root_freed(self, sp):
        del self.gen[sp.id], self.flushed_gen[sp.id]
        self.host.metrics.mask_free(self.table_bytes)

    def vcpu_migrated(self, vcpu, cpu):
        for root in reachable_roots(vcpu):
            if root.sp is not None:
                gen, seen = self.gen[root.sp.id], self.flushed_gen[root.sp.id]
                if seen.get(cpu) == gen:
                    continue
                seen[cpu] = gen
            vmx_flush_tlb_ept_root(self.host, cpu, root)

    def flush_remote_tlbs(self, kvm):
        for sp in kvm.roots.values():
            self.gen[sp.id] += 1
        super().flush_remote_tlbs(kvm)
