"""The stale-translation oracle: the safety check. It observes; it never fixes state.

At every VM entry, after requests are serviced and the root is loaded, the pCPU may still cache
translations for the active root's EP4TA. They are stale if they belong to another root (the
page was freed and reused: H1) or to an older epoch of this root (its SPTEs were zapped since).
Each stale use is counted once, under the first rule that matches (metrics.HAZARDS), and also
under every rule that applies (stale_any_kind: an h4 entry reached through fast_pgd_switch()
is h3 as well, so a hole of h3 or h5 does not hide behind h4):

  h1  the cached tag belongs to a different root (EP4TA reuse)
  h4  a remote flush could not reach this entry: on bare metal, none of the VM's vCPUs had a
      VMCS loaded on this pCPU, so no request or IPI could clean it; nested on Hyper-V, the
      hypercall flushed only the vCPUs' last-loaded roots, not this one
  h3  the active root came from prev_roots via fast_pgd_switch() since the last load/migration
  h5  the active root is a guest_mmu (shadow-EPT) root
  h2  anything else: a migration flush was missing

Special roots (hazard H6 of kvm-flush-semantics.md) never get a kind: with EPT the only root
without a shadow page is the dummy root (the zero page), which maps nothing, so it can never
hold a translation; what H6 costs is the flushing strategies must still do (INVEPT counts).

Each VM entry that finds stale translations counts once; stale entries stay until an INVEPT
removes them, so a pCPU left stale is counted again at every later entry on that root.

No strategy is named here: which strategies are safe is whatever this finds on the trace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hvmodel.host import Host, TlbEntry
    from hvmodel.kvm import Kvm, KvmVcpu


class Oracle:
    def __init__(self, host: Host):
        self.host = host

    def classify(self, vcpu: KvmVcpu, root, entry: TlbEntry) -> list[str]:
        """Every kind that applies, in the order of the rules (h2 only if no other does)."""
        mmu = vcpu.arch.mmu
        applies = {
            "h1": entry.sp is not root.sp,
            "h4": entry.missed,
            "h3": mmu.root_via_fast_switch,
            "h5": mmu is vcpu.arch.guest_mmu,
        }
        return [k for k, yes in applies.items() if yes] or ["h2"]

    def stale_use(self, cpu: int, vcpu: KvmVcpu, root, entry: TlbEntry) -> None:
        kinds = self.classify(vcpu, root, entry)
        kind = kinds[0]
        sp = root.sp
        self.host.metrics.stale(
            cpu,
            self.host.now,
            kinds,
            lambda: {
                "t_ns": self.host.now,
                "kind": kind,
                "vm": vcpu.kvm.id,
                "vcpu": vcpu.vcpu_idx,
                "pcpu": cpu,
                "mmu": vcpu.arch.mmu.name,
                "root": sp.id,
                "hpa": hex(root.hpa),
                "epoch": sp.epoch,
                "cached_root": entry.sp.id,
                "cached_vm": entry.sp.kvm.id,
                "cached_epoch": entry.epoch,
            },
        )

    def note_remote_flush(self, kvm: Kvm, flushed_hpas: set[int] | None = None) -> None:
        """Before a remote flush, mark the cached entries it cannot reach (H4).

        Bare metal (flushed_hpas None): entries on pCPUs where no vCPU of the VM has a VMCS
        loaded; no request will ever run there. Hyper-V: entries of roots other than the ones
        the hypercalls flush (each vCPU's last-loaded root), on every pCPU.
        """
        host = self.host
        loaded = {v.vmcs01.cpu for v in kvm.vcpus} | {v.vmcs02.cpu for v in kvm.vcpus}
        for sp in kvm.roots.values():
            if flushed_hpas is not None and sp.hpa in flushed_hpas:
                continue
            for cpu in host.tlb_holders.get(sp.hpa, ()):
                if flushed_hpas is not None or cpu not in loaded:
                    e = host.tlb[cpu].get(sp.hpa)
                    if e is not None and e.sp is sp:
                        e.missed = True
