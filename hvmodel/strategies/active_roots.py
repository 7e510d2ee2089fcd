"""D — "KVM: VMX: Flush only active EPT roots on pCPU migration" (Sean Christopherson, patch 4/5
of the sketch in aJKW9gTeyh0-pvcg@google.com, Aug 2025; unmerged).

On a new pCPU, synchronously in vmx_vcpu_load_vmcs(): INVEPT single-context on the current and
previous roots of root_mmu and guest_mmu (vmx_flush_ept_on_pcpu_migration), at most 8; the
dummy root, which has no shadow page, is flushed single-context too. No IPIs. Roots reached
later through kvm_mmu_load() are flushed there, so these are the only EP4TAs the vCPU can use
unflushed. E and F are D with a rule for skipping roots (needs_flush).

`mmus` and `prev_roots` narrow what is flushed, to ask what the patch would miss without each
part: the current root only (Sean: fast_pgd_switch() to a previous root never flushes, hazard
H3) or root_mmu only (the shadow-EPT roots of guest_mmu, hazard H5).
"""

from hvmodel.errors import ConfigError
from hvmodel.strategies.base import MMUS, KernelDefaults, reachable_roots
from hvmodel.vmx import vmx_flush_tlb_ept_root


class ActiveRoots(KernelDefaults):
    name = "active_roots"
    fast_code = 3  # hvmodel/fast/src/policy.h

    def __init__(self, mask_sizing: str = "nr_cpu_ids", mmus: tuple[str, ...] = MMUS, prev_roots: bool = True):
        super().__init__(mask_sizing)
        if not set(mmus) <= set(MMUS):
            raise ConfigError("strategy.mmus", f"unknown {sorted(set(mmus) - set(MMUS))}; allowed: {', '.join(MMUS)}")
        self.mmus, self.prev_roots = tuple(m for m in MMUS if m in mmus), bool(prev_roots)

    def vcpu_migrated(self, vcpu, cpu):
        for root in reachable_roots(vcpu, self.mmus, self.prev_roots):
            if root.sp is None or self.needs_flush(root.sp, cpu):  # special roots: always
                vmx_flush_tlb_ept_root(self.host, cpu, root)

    def needs_flush(self, sp, cpu: int) -> bool:
        """Whether `cpu` must flush root `sp` now (and record that it did)."""
        return True
