"""The physical host: topology, pCPUs with their EPT TLBs, IPIs, and the flush primitives.

Hardware model (Intel SDM Vol. 3C §28.3, kvm-flush-semantics.md §1): each logical CPU caches
guest-physical and combined mappings tagged by EP4TA, the root's HPA only (EPTP bits 51:12; the
page-walk length and A/D bits are not part of the tag). Every INVEPT/INVVPID is local to one
pCPU; reaching another pCPU takes an IPI (or, nested on Hyper-V, a flush hypercall).

Per pCPU we keep `tlb[ep4ta] -> TlbEntry(root page, epoch)`: "this pCPU may still hold
translations of that root as they were at that epoch". Capacity is not modelled: architecturally
nothing guarantees eviction, so a tag that was never invalidated may still be used.

Sharding: a Host may own only some pCPUs. VM-level state (vCPU modes, roots, requests) is
updated for every event in every shard; TLB contents, counters and costs only for owned pCPUs.
The primitives below are the only places that touch per-pCPU state, and each checks ownership.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hvmodel.cost import CostModel
from hvmodel.errors import ConfigError, ShardingError
from hvmodel.kvm_host import IN_GUEST_MODE, OUTSIDE_GUEST_MODE
from hvmodel.metrics import Metrics, NoiseBudget
from hvmodel.mmu import PAGE_REUSE, PagePool
from hvmodel.oracle import Oracle
from hvmodel.vmx import VpidBitmap

if TYPE_CHECKING:
    from hvmodel.kvm import Kvm, KvmVcpu
    from hvmodel.strategies.base import FlushStrategy

NR_CPUS_MAX = 8192  # x86-64 NR_CPUS_RANGE_END with CPUMASK_OFFSTACK (MAXSMP)
ENVIRONMENTS = ("bare_metal", "hyperv")


def parse_cpulist(text: str, nr_cpus: int, key: str = "host.isolcpus") -> list[int]:
    """Kernel cpulist syntax ("0-3,8,10-11"), as in isolcpus= and /sys/devices/system/cpu/*."""
    cpus: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ConfigError(key, f"bad cpulist element {part!r}")
        a, b = int(lo), int(hi or lo)
        if not a <= b < nr_cpus:
            raise ConfigError(key, f"{part!r} is outside 0-{nr_cpus - 1}")
        cpus.extend(range(a, b + 1))
    return cpus


@dataclass(frozen=True)
class Topology:
    """CPUs, sockets, NUMA nodes, SMT siblings, RT-isolated vs. housekeeping CPUs.

    CPU numbering follows Linux on Intel servers: CPUs 0..cores-1 are the first hardware thread
    of each core, SMT siblings follow at +cores. A core's NUMA node is core // cores_per_node.
    Unless `isolcpus` is given, the first `housekeeping_per_node` cores of each node (both
    threads) are housekeeping and every other CPU is RT-isolated.

    `smt_cores` (a cpulist of core numbers) describes a host with SMT on only some cores, as a
    BIOS that disables SMT per core, or a hybrid part, enumerates it: only those cores have
    `smt` threads, and their siblings follow the first threads in core order (core c's k-th
    sibling is CPU cores + (k-1) * len(smt_cores) + its rank among smt_cores). nr_cpus then
    counts every thread: cores + (smt - 1) * len(smt_cores).
    """

    nr_cpus: int
    sockets: int = 1
    numa_nodes: int = 1
    smt: int = 2
    smt_cores: str | None = None  # cores with SMT on (cpulist of core numbers); None: every core
    housekeeping_per_node: int = 1
    isolcpus: str | None = None
    x2apic_cluster_size: int = 16  # 16 in x2APIC cluster mode; 1 means physical mode
    env: str = "bare_metal"  # or "hyperv": this "host" is itself a VM, KVM runs nested on Hyper-V
    page_reuse: str = "lifo"  # how freed root pages come back (mmu.PagePool): "lifo" or "cached"
    rcu_grace_ns: int = 20_000_000  # page_reuse=cached: a freed TDP root's page waits this long
    name: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.isolcpus, int) and not isinstance(self.isolcpus, bool):
            object.__setattr__(self, "isolcpus", str(self.isolcpus))  # host.isolcpus=19: Hydra parses one CPU as an int
        if self.isolcpus is not None and not isinstance(self.isolcpus, str):
            raise ConfigError("host.isolcpus", f"must be a cpulist such as 1-7,9-15, got {self.isolcpus!r}")
        if self.env not in ENVIRONMENTS:
            raise ConfigError("host.env", f"unknown {self.env!r}; allowed: {', '.join(ENVIRONMENTS)}")
        if not 1 <= self.nr_cpus <= NR_CPUS_MAX:
            raise ConfigError("host.nr_cpus", f"must be in 1..{NR_CPUS_MAX} (NR_CPUS), got {self.nr_cpus}")
        if self.page_reuse not in PAGE_REUSE:
            raise ConfigError("host.page_reuse", f"unknown {self.page_reuse!r}; allowed: {', '.join(PAGE_REUSE)}")
        if not isinstance(self.rcu_grace_ns, int) or self.rcu_grace_ns < 0:
            raise ConfigError("host.rcu_grace_ns", f"must be an integer >= 0, got {self.rcu_grace_ns!r}")
        for key in ("sockets", "numa_nodes", "smt", "x2apic_cluster_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"host.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.numa_nodes % self.sockets:
            raise ConfigError("host.numa_nodes", f"{self.numa_nodes} nodes do not split over {self.sockets} sockets")
        if isinstance(self.smt_cores, int) and not isinstance(self.smt_cores, bool):
            object.__setattr__(self, "smt_cores", str(self.smt_cores))
        if self.smt_cores is None and self.nr_cpus % (self.smt * self.numa_nodes):
            raise ConfigError("host.nr_cpus", f"{self.nr_cpus} CPUs do not split into {self.numa_nodes} nodes x smt {self.smt}")
        if self.smt_cores is not None:
            self._check_smt_cores()
        if not 0 <= self.housekeeping_per_node <= self.cores_per_node:
            raise ConfigError("host.housekeeping_per_node", f"must be in 0..{self.cores_per_node}")
        if self.rt_mask().all():
            raise ConfigError(
                "host.isolcpus" if self.isolcpus is not None else "host.housekeeping_per_node",
                "at least one CPU must stay housekeeping (the kernel and VMM threads run there)",
            )

    def _check_smt_cores(self) -> None:
        if not isinstance(self.smt_cores, str):
            raise ConfigError("host.smt_cores", f"must be a cpulist of core numbers such as 0-7, got {self.smt_cores!r}")
        if self.smt < 2:
            raise ConfigError("host.smt_cores", "needs host.smt >= 2 (the threads of the cores it names)")
        if self.cores < 1 or self.cores % self.numa_nodes:
            raise ConfigError(
                "host.smt_cores", f"{self.nr_cpus} CPUs minus the siblings leave {self.cores} cores: not {self.numa_nodes} equal nodes"
            )
        self._smt_core_list(self.cores)  # every named core exists

    @property
    def cores(self) -> int:
        if self.smt_cores is None:
            return self.nr_cpus // self.smt
        return self.nr_cpus - (self.smt - 1) * len(self._smt_core_list(NR_CPUS_MAX))

    def _smt_core_list(self, cores: int) -> list[int]:
        return sorted(set(parse_cpulist(self.smt_cores, cores, key="host.smt_cores")))

    def core_of(self) -> np.ndarray:
        """Each CPU's core: first threads in order, then the siblings (see the class)."""
        if self.smt_cores is None:
            return np.arange(self.nr_cpus) % self.cores
        return np.concatenate([np.arange(self.cores), np.tile(self._smt_core_list(self.cores), self.smt - 1)])

    @property
    def cores_per_node(self) -> int:
        return self.cores // self.numa_nodes

    def node_of(self) -> np.ndarray:
        return self.core_of() // self.cores_per_node

    def rt_mask(self) -> np.ndarray:
        """True for RT-isolated CPUs (isolcpus=/nohz_full=), False for housekeeping."""
        if self.isolcpus is not None:
            mask = np.zeros(self.nr_cpus, dtype=bool)
            mask[parse_cpulist(self.isolcpus, self.nr_cpus)] = True
            return mask
        return self.core_of() % self.cores_per_node >= self.housekeeping_per_node

    def node_cpus(self, node: int) -> np.ndarray:
        return np.flatnonzero(self.node_of() == node)


class TlbEntry:
    """Translations cached under one EP4TA: the root they came from and its epoch then.

    Once stale, an entry stays stale until an INVEPT removes it: a guest that refills from the
    current root still holds the old translations beside the new ones.
    """

    __slots__ = ("sp", "epoch", "missed")

    def __init__(self, sp, epoch: int):
        self.sp = sp
        self.epoch = epoch
        self.missed = False  # a remote flush could not reach this entry (oracle H4)


class Host:
    """The machine: pCPUs, the page allocator, the VPID bitmap, and the flush primitives."""

    def __init__(
        self,
        topo: Topology,
        strategy: FlushStrategy,
        cost: CostModel,
        noise: NoiseBudget,
        owned_nodes: Iterable[int] | None = None,
        ept_ad: bool = True,
        max_examples: int = 10,
        local_nodes: Iterable[int] | None = None,
    ):
        self.topo, self.strategy, self.cost, self.env, self.ept_ad = topo, strategy, cost, topo.env, ept_ad
        n = topo.nr_cpus
        nodes = range(topo.numa_nodes) if owned_nodes is None else sorted(set(owned_nodes))
        self.owned = np.isin(topo.node_of(), list(nodes))
        self.owned_cpus = np.flatnonzero(self.owned)
        # A split shard sees only the events of the VMs of its nodes (`local_nodes`); an
        # on_each_cpu broadcast that leaves them is recorded for the other shards (outbox).
        self.split = local_nodes is not None
        self.local = np.isin(topo.node_of(), list(local_nodes)) if self.split else np.ones(n, bool)
        self.local_cpus = np.flatnonzero(self.local)
        assert not (self.owned & ~self.local).any(), "a shard owns only pCPUs of its own nodes"
        self.outbox: list[tuple[int, int, int]] = []  # (event index, src, hpa)
        self.event = 0  # index of the event being replayed
        self.online_cpus = np.arange(n)  # CPU hotplug is not modelled
        self.tlb: list[dict[int, TlbEntry]] = [{} for _ in range(n)]
        self.tlb_holders: dict[int, set[int]] = {}  # EP4TA -> owned pCPUs caching it
        self.running: list[KvmVcpu | None] = [None] * n  # vCPU loaded here and not put
        self.in_guest: list[KvmVcpu | None] = [None] * n  # vCPU in IN_GUEST_MODE here
        self.guest_mode = np.zeros(n, bool)  # the same, as a mask, for IPIs to many pCPUs
        self.guest_since = [0] * n  # when the vCPU in guest mode here entered (guest_ns)
        self.metrics = Metrics(n, noise, max_examples)
        self.oracle = Oracle(self)
        self.pool = PagePool(topo.numa_nodes, topo.page_reuse == "cached", topo.rcu_grace_ns)
        self.vpids = VpidBitmap()
        self.vms: dict[int, Kvm] = {}
        self.now = 0
        self.this_cpu = 0  # smp_processor_id() of the code running for the current event
        self.reentry: list[KvmVcpu] = []  # vCPUs kicked out of guest mode during this event
        # the interruption open on each pCPU during this event, and its cost so far
        self.irq_open = np.zeros(n, bool)
        self.irq_us = np.zeros(n, np.float64)
        strategy.attach(self)

    # --- accounting -------------------------------------------------------------------
    def charge(self, cpu: int, us: float) -> None:
        """Charge host time to an owned pCPU; inside an interruption it is also noise."""
        self.metrics.cpu_f["flush_overhead_us"][cpu] += us
        if self.irq_open[cpu]:
            self.irq_us[cpu] += us

    # --- local flush instructions -----------------------------------------------------
    def invept_single(self, cpu: int, hpa: int) -> None:
        """INVEPT type 1 (single-context) on `cpu`: drop everything tagged `hpa`."""
        if not self.owned[cpu]:
            return
        self.metrics.cpu["invept_single"][cpu] += 1
        self.charge(cpu, self.cost.invept_single_us)
        self._drop(cpu, hpa)

    def _drop(self, cpu: int, hpa: int) -> bool:
        """Remove the entries tagged `hpa` from an owned pCPU; the guest pays to refill them."""
        e = self.tlb[cpu].pop(hpa, None)
        if e is None:
            return False
        self.tlb_holders[hpa].discard(cpu)
        self.metrics.cpu_f["flush_overhead_us"][cpu] += self.cost.refill_us
        return True

    def invept_global(self, cpu: int) -> None:
        """INVEPT type 2 (all-context) on `cpu`: drop every EP4TA, other VMs' included."""
        if not self.owned[cpu]:
            return
        self.metrics.cpu["invept_global"][cpu] += 1
        self.charge(cpu, self.cost.invept_global_us)
        tlb = self.tlb[cpu]
        for hpa in tlb:
            self.tlb_holders[hpa].discard(cpu)
        self.metrics.cpu_f["flush_overhead_us"][cpu] += self.cost.refill_us * len(tlb)
        tlb.clear()

    def vmcs_load_new_cpu(self, cpu: int) -> None:
        """A VMCS became active on `cpu` (VMPTRLD, host-state VMWRITEs): a migration."""
        if self.owned[cpu]:
            self.metrics.cpu["migrations"][cpu] += 1
            self.charge(cpu, self.cost.vmcs_migrate_us)

    def invvpid(self, cpu: int) -> None:
        """INVVPID: removes linear/combined mappings only, never guest-physical ones."""
        if self.owned[cpu]:
            self.metrics.cpu["invvpid"][cpu] += 1
            self.charge(cpu, self.cost.invvpid_us)

    # --- guest use of the TLB ---------------------------------------------------------
    def tlb_enter(self, cpu: int, vcpu: KvmVcpu, root) -> None:
        """VM entry on `cpu` with `root` (a KvmMmuRootInfo): check, then start caching."""
        sp = root.sp
        if not self.owned[cpu] or sp is None:  # special roots map nothing
            return
        tlb = self.tlb[cpu]
        e = tlb.get(root.hpa)
        if e is None:
            tlb[root.hpa] = TlbEntry(sp, sp.epoch)
            self.tlb_holders.setdefault(root.hpa, set()).add(cpu)
        elif e.sp is not sp or e.epoch != sp.epoch:
            self.oracle.stale_use(cpu, vcpu, root, e)

    # --- IPIs -------------------------------------------------------------------------
    def send_ipis(self, src: int, cpus: np.ndarray, counter: str, flush_hpa: int | None = None) -> None:
        """smp_call_function_many(mask, func, wait=1) from `src` to the sorted, distinct pCPUs
        `cpus`; with `flush_hpa`, func is kvm_flush_tlb_root (INVEPT single-context on that
        EP4TA), otherwise it only acknowledges.

        An IPI that lands on a pCPU in guest mode forces a VM exit (external-interrupt exiting is
        always on in VMX); that vCPU re-enters after the event (Engine.finish_event), servicing
        its requests, all of it counted as one interruption of that pCPU. The kicks are VM-level
        state (every shard applies them, in pCPU order); receiving the IPI and running the
        handler is per-pCPU work, done only for owned targets, for all of them at once: B sends
        8191 of these per root allocation on an 8192-CPU host.
        """
        targets = cpus[cpus != src]
        if not len(targets):
            return
        if self.owned[src]:
            self.charge(src, self.cost.ipi_send_us * self._icr_writes(targets))
        if self.split and not self.local[targets].all():
            if flush_hpa is None or len(targets) != self.topo.nr_cpus - 1:
                raise ShardingError(f"an IPI from pCPU {src} to pCPUs outside this shard's nodes: the VMs are not node-local")
            self.outbox.append((self.event, src, flush_hpa))  # on_each_cpu(): the other shards' pCPUs get it too
            targets = targets[self.local[targets]]
        in_guest = self.guest_mode[targets]
        for dst in targets[in_guest].tolist():
            vcpu = self.in_guest[dst]
            self.leave_guest(vcpu)
            self.reentry.append(vcpu)
        owned = self.owned[targets]
        dst, kicked = targets[owned], targets[owned & in_guest]
        m, c = self.metrics, self.cost
        m.cpu[counter][dst] += 1
        self.irq_open[dst] = True
        self._charge_all(dst, c.ipi_receive_us)
        m.cpu["vmexits_from_ipi"][kicked] += 1
        self._charge_all(kicked, c.vmexit_us)
        if flush_hpa is not None:
            m.cpu["invept_single"][dst] += 1
            self._charge_all(dst, c.invept_single_us)
            for cpu in sorted(self.tlb_holders.get(flush_hpa, set()) & set(dst.tolist())):
                self._drop(cpu, flush_hpa)

    def _charge_all(self, cpus: np.ndarray, us: float) -> None:
        """charge() for distinct pCPUs that all have an interruption open."""
        self.metrics.cpu_f["flush_overhead_us"][cpus] += us
        self.irq_us[cpus] += us

    def _icr_writes(self, targets: np.ndarray) -> int:
        """x2APIC cluster mode sends one ICR write per cluster with targets (physical mode: 1 per
        CPU). A mask of every online CPU but this one is one all-but-self shorthand write
        (native_send_call_func_ipi() with apic_use_ipi_shorthand, the ipi_shorthand=auto default
        once every CPU is online): on_each_cpu() and any request that reaches every other CPU."""
        if len(targets) == self.topo.nr_cpus - 1:
            return 1
        return len(np.unique(targets // self.topo.x2apic_cluster_size))

    # --- guest mode (VM-level: every shard tracks every pCPU) -------------------------
    def enter_guest(self, vcpu: KvmVcpu) -> None:
        vcpu.mode = IN_GUEST_MODE
        self.in_guest[vcpu.cpu] = vcpu
        self.guest_mode[vcpu.cpu] = True
        self.guest_since[vcpu.cpu] = self.now

    def leave_guest(self, vcpu: KvmVcpu) -> None:
        vcpu.mode = OUTSIDE_GUEST_MODE
        self.in_guest[vcpu.cpu] = None
        self.guest_mode[vcpu.cpu] = False
        if self.owned[vcpu.cpu]:
            self.metrics.cpu["vm_exits"][vcpu.cpu] += 1
            self.metrics.cpu["guest_ns"][vcpu.cpu] += self.now - self.guest_since[vcpu.cpu]

    def close_accounting(self, end_ns: int) -> None:
        """The trace's rates at its end: guest mode, steal and vCPU lifetimes still open run to
        end_ns (the trace's duration, the same in every shard)."""
        m = self.metrics
        for cpu, vcpu in enumerate(self.in_guest):
            if vcpu is not None and self.owned[cpu]:
                m.cpu["guest_ns"][cpu] += end_ns - self.guest_since[cpu]
        for kvm in self.vms.values():
            m.vm["vcpu_ns"] += len(kvm.vcpus) * (end_ns - kvm.created_ns)
            for vcpu in kvm.vcpus:
                if vcpu.preempted_ns >= 0 and self.owned[vcpu.cpu]:
                    m.cpu["steal_ns"][vcpu.cpu] += end_ns - vcpu.preempted_ns

    def hv_flush_guest_physical_address_space(self, src: int, hpa: int) -> None:
        """HvCallFlushGuestPhysicalAddressSpace: L0 drops EP4TA `hpa` on every pCPU.

        Not an IPI of this kernel and no VM exit here; a vCPU running on that root simply
        keeps running and refills from the current root.
        """
        self.metrics.vm["hv_flush_hypercalls"] += 1
        if self.owned[src]:
            self.charge(src, self.cost.hv_flush_hypercall_us)
        for cpu in sorted(self.tlb_holders.get(hpa, ())):
            if not self._drop(cpu, hpa):
                continue
            vcpu = self.in_guest[cpu]
            if vcpu is not None and vcpu.arch.mmu.root.hpa == hpa:
                self.tlb_enter(cpu, vcpu, vcpu.arch.mmu.root)
