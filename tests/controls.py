"""Deliberately broken strategies, used only to show that the oracle detects and classifies
each hazard when a flush is missing. Not product code: conf/strategy never selects them. Each
is D (active_roots) with part of its flush set removed, so both engines run them."""

from hvmodel.strategies.active_roots import ActiveRoots


class NoMigrationFlush(ActiveRoots):
    """Nothing on pCPU migration, nothing extra on allocation: relies on kvm_mmu_load() alone."""

    name = "no_migration_flush"

    def __init__(self):
        super().__init__(mmus=())


class CurrentRootOnly(ActiveRoots):
    """Flushes only the current root_mmu root on migration: the mistake Sean warned about
    (fast_pgd_switch() to a previous root never flushes)."""

    name = "current_root_only"

    def __init__(self):
        super().__init__(mmus=("root_mmu",), prev_roots=False)


class RootMmuOnly(ActiveRoots):
    """D without guest_mmu: forgets the shadow-EPT roots (hazard H5)."""

    name = "root_mmu_only"

    def __init__(self):
        super().__init__(mmus=("root_mmu",))
