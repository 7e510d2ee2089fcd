"""E — per-root cpu_flushed_mask (Sean's patch 5/5 sketch, aJKW9gTeyh0-pvcg@google.com; extended
by Jeremi Piotrowski, aJ87AGnK9J0mafoi; review aKT_0Zuj2MBRrh6p: test, then set).

As D, but skip a root whose mask already has this pCPU's bit; otherwise set the bit and flush.
The mask is zero-allocated with the root page (kvm_tdp_mmu_alloc_root / mmu_alloc_root for
level >= 4) and freed with it (tdp_mmu_free_sp / kvm_mmu_free_shadow_page), so a shadow page
re-found in the hash keeps its mask. Memory: one cpumask_var_t per root.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvmodel.strategies.active_roots import ActiveRoots

if TYPE_CHECKING:
    from hvmodel.mmu import KvmMmuPage


class PerRootCpumask(ActiveRoots):
    name = "per_root_cpumask"
    fast_code = 4  # hvmodel/fast/src/policy.h

    def __init__(self, mask_sizing: str = "nr_cpu_ids"):
        super().__init__(mask_sizing)
        self.cpu_flushed_mask: dict[KvmMmuPage, set[int]] = {}  # root -> pCPUs that flushed it

    def root_created(self, sp):
        self.cpu_flushed_mask[sp] = set()
        self.host.metrics.mask_alloc(self.mask_bytes)

    def root_freed(self, sp):
        del self.cpu_flushed_mask[sp]
        self.host.metrics.mask_free(self.mask_bytes)

    def needs_flush(self, sp, cpu):
        mask = self.cpu_flushed_mask[sp]  # test, then set (review aKT_0Zuj2MBRrh6p)
        if cpu in mask:
            return False
        mask.add(cpu)
        return True
