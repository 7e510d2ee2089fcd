"""The strategy interface: the few places where the 2025 proposals change KVM.

KVM calls these hooks; `KernelDefaults` is what KVM does today (strategy A), so each strategy
overrides only what its patch changes. Strategies may keep state (masks, generations) but must
not change VM-level state other than through the kernel functions they call; that is what
keeps them comparable on one trace and what keeps sharding exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from hvmodel.errors import ConfigError
from hvmodel.kvm_host import KVM_REQ_TLB_FLUSH, VALID_PAGE
from hvmodel.kvm_main import kvm_arch_flush_remote_tlbs, kvm_make_request
from hvmodel.vmx import vmx_flush_tlb_current

if TYPE_CHECKING:
    from hvmodel.host import Host
    from hvmodel.kvm import Kvm, KvmVcpu
    from hvmodel.mmu import KvmMmuPage

NR_CPUS = 8192
PAGE_SIZE = 4096
_KMALLOC_CLASSES = (8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192)
MASK_SIZINGS = ("nr_cpu_ids", "NR_CPUS")
MMUS = ("root_mmu", "guest_mmu")  # the MMUs whose roots can be in hardware TLBs


def kmalloc_size(nbytes: int) -> int:
    """Bytes actually allocated: the kmalloc size class, or whole pages beyond 8 KiB
    (kvmalloc falls back to the page allocator / vmalloc)."""
    for size in _KMALLOC_CLASSES:
        if nbytes <= size:
            return size
    return -(-nbytes // PAGE_SIZE) * PAGE_SIZE


def cpumask_bytes(nr_cpu_ids: int, sizing: str) -> int:
    """cpumask_var_t with CPUMASK_OFFSTACK: cpumask_size() = BITS_TO_LONGS(bits) longs, where
    bits is nr_cpu_ids, or NR_CPUS for a fixed-size mask."""
    return kmalloc_size(-(-mask_cpus(nr_cpu_ids, sizing) // 64) * 8)


def mask_cpus(nr_cpu_ids: int, sizing: str) -> int:
    """How many CPUs a per-CPU structure is sized for: nr_cpu_ids, or NR_CPUS when fixed."""
    return nr_cpu_ids if sizing == "nr_cpu_ids" else NR_CPUS


def strategy_memory(nr_cpu_ids: int, sizing: str) -> tuple[int, int]:
    """Bytes of one strategy cpumask (cpumask_var_t) and of one generation table (a u32 per
    pCPU, strategy F), as allocated."""
    return cpumask_bytes(nr_cpu_ids, sizing), kmalloc_size(4 * mask_cpus(nr_cpu_ids, sizing))


def check_environment(strategy: FlushStrategy, env: str) -> None:
    if env not in strategy.environments:
        raise ConfigError("host.env", f"strategy {strategy.name} runs only with host.env in {list(strategy.environments)}, got {env!r}")


class FlushStrategy(Protocol):
    name: str
    environments: tuple[str, ...]  # where the strategy can run
    on_each_cpu: bool  # it IPIs every online pCPU, beyond the VM's own (hvmodel.split)

    def attach(self, host: Host) -> None: ...
    def vcpu_migrated(self, vcpu: KvmVcpu, cpu: int) -> None: ...
    def root_created(self, vcpu: KvmVcpu, sp: KvmMmuPage) -> None: ...
    def root_allocated(self, vcpu: KvmVcpu, sp: KvmMmuPage) -> None: ...
    def root_referenced(self, vcpu: KvmVcpu, sp: KvmMmuPage) -> None: ...
    def mmu_topup_memory_caches(self, vcpu: KvmVcpu) -> None: ...
    def root_freed(self, sp: KvmMmuPage) -> None: ...
    def kvm_mmu_load_flush(self, vcpu: KvmVcpu) -> None: ...
    def flush_tlb_current(self, vcpu: KvmVcpu) -> None: ...
    def flush_remote_tlbs(self, kvm: Kvm) -> None: ...
    def vm_created(self, kvm: Kvm) -> None: ...
    def vm_destroyed(self, kvm: Kvm) -> None: ...


class KernelDefaults:
    """Upstream KVM behaviour at every hook point."""

    name = "kernel_defaults"
    environments: tuple[str, ...] = ("bare_metal", "hyperv")
    on_each_cpu = False

    def __init__(self, mask_sizing: str = "nr_cpu_ids"):
        if mask_sizing not in MASK_SIZINGS:
            raise ConfigError("strategy.mask_sizing", f"unknown {mask_sizing!r}; allowed: {', '.join(MASK_SIZINGS)}")
        self.mask_sizing = mask_sizing
        self.host: Host | None = None

    def attach(self, host: Host) -> None:
        check_environment(self, host.env)
        self.host = host
        self.mask_bytes, self.table_bytes = strategy_memory(host.topo.nr_cpus, self.mask_sizing)

    def vcpu_migrated(self, vcpu: KvmVcpu, cpu: int) -> None:
        """vmx_vcpu_load_vmcs() on a new pCPU: flush all EPTP/VPID contexts at next entry."""
        kvm_make_request(KVM_REQ_TLB_FLUSH, vcpu)

    def root_created(self, vcpu: KvmVcpu, sp: KvmMmuPage) -> None:
        """A root page was allocated (TDP root or shadow page), in `vcpu`'s kvm_mmu_load()."""

    def root_allocated(self, vcpu: KvmVcpu, sp: KvmMmuPage) -> None:
        """kvm_mmu_load() got a fresh TDP root, or a shadow root whose root_count went 0 -> 1."""

    def root_referenced(self, vcpu: KvmVcpu, sp: KvmMmuPage) -> None:
        """mmu_alloc_root(): a shadow root got one more reference (++sp->root_count), new or not."""

    def mmu_topup_memory_caches(self, vcpu: KvmVcpu) -> None:
        """kvm_mmu_load() fills the vCPU's memory caches before it takes mmu_lock."""

    def root_freed(self, sp: KvmMmuPage) -> None:
        """The root page goes back to the allocator (no flush upstream)."""

    def kvm_mmu_load_flush(self, vcpu: KvmVcpu) -> None:
        """The flush at the end of kvm_mmu_load(): "the provenance of the root is unknown"."""
        self.flush_tlb_current(vcpu)

    def flush_tlb_current(self, vcpu: KvmVcpu) -> None:
        """kvm_x86_call(flush_tlb_current): INVEPT single-context, this pCPU only."""
        vmx_flush_tlb_current(vcpu)

    def flush_remote_tlbs(self, kvm: Kvm) -> None:
        kvm_arch_flush_remote_tlbs(kvm)

    def vm_created(self, kvm: Kvm) -> None:
        pass

    def vm_destroyed(self, kvm: Kvm) -> None:
        pass


def reachable_roots(vcpu: KvmVcpu, mmus: tuple[str, ...] = MMUS, prev_roots: bool = True):
    """Roots the vCPU can run on without kvm_mmu_load(): root + prev_roots of root_mmu and
    guest_mmu (nested_mmu never holds an EPTP). At most 2 x (1 + 3) = 8."""
    for name in mmus:
        mmu = getattr(vcpu.arch, name)
        for root in (mmu.root, *mmu.prev_roots) if prev_roots else (mmu.root,):
            if VALID_PAGE(root.hpa):
                yield root
