"""F — per-root flush generations (variant; Sean, 2021: track "when that pCPU last flushed";
compare SVM's per-pCPU ASID generation in pre_svm_run()).

Each root has a generation, bumped by every remote flush of its VM; each (root, pCPU) remembers
the generation it last flushed at. On migration, flush a reachable root unless this pCPU
already flushed it at the current generation. Memory: a u32 per (root, pCPU), allocated as a
per-root array of nr_cpu_ids entries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvmodel.strategies.active_roots import ActiveRoots

if TYPE_CHECKING:
    from hvmodel.mmu import KvmMmuPage


class RootGeneration(ActiveRoots):
    name = "root_generation"
    fast_code = 6  # hvmodel/fast/src/policy.h

    def __init__(self, mask_sizing: str = "nr_cpu_ids"):
        super().__init__(mask_sizing)
        self.gen: dict[KvmMmuPage, int] = {}  # root -> generation
        self.flushed_gen: dict[KvmMmuPage, dict[int, int]] = {}  # root -> {pCPU: generation}

    def root_created(self, vcpu, sp):
        self.gen[sp] = 0
        self.flushed_gen[sp] = {}
        self.host.metrics.mask_alloc(self.table_bytes)

    def root_freed(self, sp):
        del self.gen[sp], self.flushed_gen[sp]
        self.host.metrics.mask_free(self.table_bytes)

    def needs_flush(self, sp, cpu):
        gen, seen = self.gen[sp], self.flushed_gen[sp]
        if seen.get(cpu) == gen:
            return False
        seen[cpu] = gen
        return True

    def flush_remote_tlbs(self, kvm):
        for sp in kvm.roots.values():
            self.gen[sp] += 1
        super().flush_remote_tlbs(kvm)
