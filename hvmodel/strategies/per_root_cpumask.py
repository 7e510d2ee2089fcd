"""E — per-root cpu_flushed_mask (Sean's patch 5/5 sketch, aJKW9gTeyh0-pvcg@google.com; extended
by Jeremi Piotrowski, aJ87AGnK9J0mafoi; review aKT_0Zuj2MBRrh6p: test, then set).

As D, but skip a root whose mask already has this pCPU's bit; otherwise set the bit and flush.
Memory: one cpumask_var_t per root.

Two choices the mail leaves open, each a parameter:

- `mask_lifetime`. `page` (default): the mask is zero-allocated with the root page and freed
  with it (tdp_mmu_free_sp / kvm_mmu_free_shadow_page), so a shadow page re-found in the hash
  keeps its bits. `reference`: the sketch calls alloc_root_cpu_mask() in mmu_alloc_root() right
  after "++sp->root_count;", on every reference of a shadow root, so a re-found shadow root's
  mask starts empty again (TDP roots still get theirs once, in kvm_tdp_mmu_alloc_root()). What
  the re-allocation does with the old mask (reuse, or a leak) is not in the diff; the memory
  counted is one mask per root either way.
- `mask_source`. `kmalloc` (default): each mask is allocated when its root is. `memory_cache`:
  the review asks for masks from a kvm_mmu_memory_cache, because mmu_lock is held where roots are
  allocated. kvm_mmu_load() then tops the vCPU's cache up (mmu_topup_memory_caches(): when it is
  empty, to KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE = 40 objects), a new root takes one, a freed mask
  goes back to the allocator, and the cache is freed with the vCPU. cpumask_bytes_peak counts
  the cached objects too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvmodel.errors import ConfigError
from hvmodel.mmu import KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE
from hvmodel.strategies.active_roots import ActiveRoots

if TYPE_CHECKING:
    from hvmodel.mmu import KvmMmuPage

MASK_LIFETIMES = ("page", "reference")
MASK_SOURCES = ("kmalloc", "memory_cache")


class PerRootCpumask(ActiveRoots):
    name = "per_root_cpumask"
    fast_code = 4  # hvmodel/fast/src/policy.h

    def __init__(self, mask_sizing: str = "nr_cpu_ids", mask_lifetime: str = "page", mask_source: str = "kmalloc"):
        super().__init__(mask_sizing)
        for key, value, allowed in (("mask_lifetime", mask_lifetime, MASK_LIFETIMES), ("mask_source", mask_source, MASK_SOURCES)):
            if value not in allowed:
                raise ConfigError(f"strategy.{key}", f"unknown {value!r}; allowed: {', '.join(allowed)}")
        self.mask_lifetime, self.mask_source = mask_lifetime, mask_source
        self.cpu_flushed_mask: dict[KvmMmuPage, set[int]] = {}  # root -> pCPUs that flushed it
        self.cached: dict = {}  # memory_cache: vCPU -> masks in its cache

    def mmu_topup_memory_caches(self, vcpu):
        if self.mask_source == "memory_cache" and self.cached.get(vcpu, 0) < 1:
            have = self.cached.get(vcpu, 0)
            self.cached[vcpu] = KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE
            self.host.metrics.mask_alloc((KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE - have) * self.mask_bytes)

    def root_created(self, vcpu, sp):
        self.cpu_flushed_mask[sp] = set()
        if self.mask_source == "memory_cache":
            self.cached[vcpu] -= 1  # kvm_mmu_memory_cache_alloc(): already counted
        else:
            self.host.metrics.mask_alloc(self.mask_bytes)

    def root_referenced(self, vcpu, sp):
        if self.mask_lifetime == "reference":
            self.cpu_flushed_mask[sp] = set()

    def root_freed(self, sp):
        del self.cpu_flushed_mask[sp]
        self.host.metrics.mask_free(self.mask_bytes)

    def vm_destroyed(self, kvm):
        for vcpu in kvm.vcpus:  # kvm_mmu_free_memory_caches()
            self.host.metrics.mask_free(self.cached.pop(vcpu, 0) * self.mask_bytes)

    def needs_flush(self, sp, cpu):
        mask = self.cpu_flushed_mask[sp]  # test, then set (review aKT_0Zuj2MBRrh6p)
        if cpu in mask:
            return False
        mask.add(cpu)
        return True
