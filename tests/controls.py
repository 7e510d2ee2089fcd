"""Deliberately broken strategies, used only to show that the oracle detects and classifies
each hazard when a flush is missing. Not product code: conf/strategy never selects them."""

from hvmodel.strategies.active_roots import ActiveRoots
from hvmodel.strategies.base import KernelDefaults
from hvmodel.vmx import vmx_flush_tlb_ept_root


class NoMigrationFlush(KernelDefaults):
    """Nothing on pCPU migration, nothing extra on allocation: relies on kvm_mmu_load() alone."""

    name = "no_migration_flush"

    def vcpu_migrated(self, vcpu, cpu):
        pass


class CurrentRootOnly(KernelDefaults):
    """Flushes only the current root_mmu root on migration: the mistake Sean warned about
    (fast_pgd_switch() to a previous root never flushes)."""

    name = "current_root_only"

    def vcpu_migrated(self, vcpu, cpu):
        root = vcpu.arch.root_mmu.root
        if root.hpa != -1:
            vmx_flush_tlb_ept_root(self.host, cpu, root)


class RootMmuOnly(ActiveRoots):
    """D without guest_mmu: forgets the shadow-EPT roots (hazard H5)."""

    name = "root_mmu_only"

    def vcpu_migrated(self, vcpu, cpu):
        mmu = vcpu.arch.root_mmu
        for root in (mmu.root, *mmu.prev_roots):
            if root.hpa != -1:
                vmx_flush_tlb_ept_root(self.host, cpu, root)
