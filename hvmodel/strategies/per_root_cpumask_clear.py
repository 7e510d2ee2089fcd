"""E' — E plus clearing the VM's root masks on every remote flush.

The inferred fix for hazard H4 (kvm-flush-semantics.md §6): a bare-metal remote flush only
reaches pCPUs running the VM now, so pCPUs the VM left keep stale entries while their mask
bits say "already flushed". Clearing the masks makes the next migration to any pCPU flush the
root again; a bit is set again when that pCPU next flushes the root.
"""

from hvmodel.strategies.per_root_cpumask import PerRootCpumask


class PerRootCpumaskClear(PerRootCpumask):
    name = "per_root_cpumask_clear"
    fast_code = 5  # hvmodel/fast/src/policy.h

    def flush_remote_tlbs(self, kvm):
        for sp in kvm.roots.values():
            self.cpu_flushed_mask[sp].clear()
        super().flush_remote_tlbs(kvm)
