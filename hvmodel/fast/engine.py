"""FastEngine: hvmodel.engine.Engine, compiled (hvmodel/fast/src). Same constructor, same
methods, same result, bit for bit (tests/test_fast_engine.py)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from hvmodel.cost import CostModel
from hvmodel.errors import ConfigError, ShardingError
from hvmodel.fast.digest import SRC, source_digest
from hvmodel.host import Topology
from hvmodel.metrics import HAZARDS, PER_CPU_COUNTERS, PER_CPU_FLOATS, REPLICATED, NoiseBudget
from hvmodel.strategies.base import MMUS, FlushStrategy, KernelDefaults, check_environment, strategy_memory
from hvmodel.trace import EVENT_DTYPE, EVENT_NAMES, Trace, TraceError

try:
    from hvmodel.fast import _engine
except ImportError as e:  # never fall back to the reference engine silently
    raise ImportError(f"the compiled engine is not built ({e}); run `make` or `pip install -e .`") from None

if source_digest() != _engine.SOURCE_DIGEST:
    raise ImportError(f"the compiled engine was built from other sources than {SRC}; rebuild: `make` or `pip install -e .`")
COST_FIELDS = _engine.COST_FIELDS
_LAYOUT = (EVENT_DTYPE.itemsize, *(EVENT_DTYPE.fields[f][1] for f in ("time_ns", "kind", "vm", "vcpu", "pcpu", "arg")))
assert _engine.EVENT_LAYOUT == _LAYOUT, (_engine.EVENT_LAYOUT, _LAYOUT)
assert (
    PER_CPU_COUNTERS,
    PER_CPU_FLOATS,
    REPLICATED,
    tuple(HAZARDS),
) == (_engine.PER_CPU_COUNTERS, _engine.PER_CPU_FLOATS, _engine.REPLICATED, _engine.HAZARDS)

HOOKS = tuple(k for k in FlushStrategy.__dict__ if not k.startswith("_") and callable(getattr(KernelDefaults, k, None)))
HOOKS += ("needs_flush", "flush_root_on")
MMU_NAMES = ("root_mmu", "guest_mmu")
_FLUSH_OVERHEAD = PER_CPU_FLOATS.index("flush_overhead_us")  # its row in result()'s float matrix
# the reference's key order (hvmodel.oracle.Oracle.stale_use)
EXAMPLE_KEYS = ("t_ns", "kind", "vm", "vcpu", "pcpu", "mmu", "root", "hpa", "epoch", "cached_root", "cached_vm", "cached_epoch")


def strategy_code(strategy) -> int:
    """The compiled policy of a strategy object (hvmodel/fast/src/policy.h): its class's
    `fast_code`. ValueError if a subclass changes a hook: the compiled code would silently do
    something else."""
    cls = type(strategy)
    owner = next((k for k in cls.__mro__ if "fast_code" in k.__dict__), None)
    if owner is None:
        raise ValueError(f"{cls.__name__} has no compiled version")
    for k in cls.__mro__[: cls.__mro__.index(owner)]:
        changed = sorted(h for h in HOOKS if h in k.__dict__)
        if changed:
            raise ValueError(f"{k.__name__} changes {', '.join(changed)} of {owner.__name__}; it has no compiled version")
    assert _engine.POLICIES[owner.fast_code] == owner.name, owner
    return owner.fast_code


def _event(kind: int) -> str:
    return EVENT_NAMES.get(kind, "?")


# the messages of the reference's TraceErrors, by the engine's error code (src/state.h)
ERRORS = {
    1: lambda e, a: f"{_event(a[0])}: VM {a[1]} does not exist",
    2: lambda e, a: f"{_event(a[0])}: VM {a[1]} has no vCPU {a[2]} (it has {a[3]})",
    3: lambda e, a: f"{_event(a[1])}: {e.vcpu(a[0])} is not loaded on any pCPU (vcpu_load it first)",
    4: lambda e, a: f"pcpu {a[0]} does not exist (host has {a[1]} CPUs)",
    5: lambda e, a: f"pcpu {a[0]} is in guest mode ({e.vcpu(a[1])}); host code cannot run there",
    6: lambda e, a: f"vm_create: VM {a[0]} already exists",
    7: lambda e, a: f"vm_create: node {a[0]} does not exist (host has {a[1]})",
    8: lambda e, a: f"vm_destroy: vCPU {a[0]} of VM {a[1]} is still loaded; vcpu_put it first",
    9: lambda e, a: f"vcpu_load: {e.vcpu(a[0])} is already loaded; vcpu_put it first",
    10: lambda e, a: f"vcpu_load: pCPU {a[0]} is running {e.vcpu(a[1])}",
    11: lambda e, a: f"smm_enter: {e.vcpu(a[0])} is already in SMM",
    12: lambda e, a: f"smm_exit: {e.vcpu(a[0])} is not in SMM",
    13: lambda e, a: f"nested_vmenter: {e.vcpu(a[0])} is already running L2",
    14: lambda e, a: f"nested_vmenter: {e.vcpu(a[0])} is in SMM",
    15: lambda e, a: f"nested_vmexit: {e.vcpu(a[0])} is not running L2",
    16: lambda e, a: f"l1_invept: {e.vcpu(a[0])} is running L2; INVEPT is executed by L1",
    17: lambda e, a: f"unknown event kind {a[0]}",
}
ERR_ROOTS_LEAKED = 18  # a model invariant, not the trace's fault
ERR_NOT_NODE_LOCAL = 19  # a split shard's assumption, not the trace's fault


class FastEngine:
    """Owns one host's model state (all pCPUs, or the pCPUs of `owned_nodes` for a shard)."""

    engine = "fast"

    def __init__(
        self,
        topo: Topology,
        strategy,
        cost: CostModel | None = None,
        noise: NoiseBudget | None = None,
        owned_nodes: Iterable[int] | None = None,
        ept_ad: bool = True,
        max_examples: int = 10,
        local_nodes: Iterable[int] | None = None,
    ):
        check_environment(strategy, topo.env)
        try:
            code = strategy_code(strategy)
        except ValueError as e:
            raise ConfigError("engine", f"{e}: use engine=reference") from None
        cost, noise = cost or CostModel(), noise or NoiseBudget()
        nodes = range(topo.numa_nodes) if owned_nodes is None else sorted(set(owned_nodes))
        c = _engine.Config()
        c.n_cpus, c.n_nodes, c.hyperv, c.ept_ad = topo.nr_cpus, topo.numa_nodes, topo.env == "hyperv", bool(ept_ad)
        c.cluster, c.owned = topo.x2apic_cluster_size, np.isin(topo.node_of(), list(nodes)).tolist()
        if local_nodes is not None:
            c.split, c.local = True, np.isin(topo.node_of(), list(local_nodes)).tolist()
        c.cost = [float(getattr(cost, f)) for f in COST_FIELDS]
        c.noise_period_ns, c.noise_threshold_us, c.noise_budget_us = noise.period_us * 1000, noise.threshold_us, noise.budget_us
        c.max_examples, c.policy = int(max_examples), code
        c.elide_migration_flush = bool(getattr(strategy, "elide_migration_flush", False))
        c.first_visit_global = getattr(strategy, "first_visit_flush", "per_root") == "global"
        c.mask_reset_on_reference = getattr(strategy, "mask_lifetime", "page") == "reference"
        c.mask_cache = getattr(strategy, "mask_source", "kmalloc") == "memory_cache"
        c.page_cached, c.rcu_grace_ns = topo.page_reuse == "cached", int(topo.rcu_grace_ns)
        mmus = getattr(strategy, "mmus", MMUS)
        c.mmus, c.prev_roots = sum(1 << i for i, m in enumerate(MMUS) if m in mmus), bool(getattr(strategy, "prev_roots", True))
        c.mask_bytes, c.table_bytes = strategy_memory(topo.nr_cpus, getattr(strategy, "mask_sizing", "nr_cpu_ids"))
        self.state = _engine.Engine(c)
        self.events = 0  # events replayed so far
        self.sim_ns = 0  # simulated time reached

    def replay(self, chunk: np.ndarray, trace: Trace) -> None:
        """Process one chunk of `trace` (errors name the trace line or event index)."""
        chunk = np.ascontiguousarray(chunk, dtype=EVENT_DTYPE)
        done = self.state.replay(chunk)
        if done < len(chunk):
            code, args = self.state.error()
            if code == ERR_ROOTS_LEAKED:
                raise AssertionError(f"roots leaked at VM destroy (VM {args[0]})")
            if code == ERR_NOT_NODE_LOCAL:
                raise ShardingError("an IPI to pCPUs outside this shard's nodes: the VMs are not node-local")
            raise TraceError(f"{trace.where(self.events + done)} (t_ns={int(chunk['time_ns'][done])}): {ERRORS[code](self, args)}")
        self.events += done
        if len(chunk):
            self.sim_ns = int(chunk["time_ns"][-1])

    def remote_on_each_cpu(self, t: int, broadcasts: list[tuple[int, int]]) -> None:
        """hvmodel.engine.Engine.remote_on_each_cpu."""
        self.state.remote_on_each_cpu(t, [b[0] for b in broadcasts], [b[1] for b in broadcasts])

    def take_outbox(self) -> list[tuple[int, int, int]]:
        return list(zip(*(a.tolist() for a in self.state.take_outbox()), strict=True))

    def take_mask_series(self) -> list[tuple[int, int, int]]:
        return list(zip(*(a.tolist() for a in self.state.take_mask_series()), strict=True))

    def vcpu(self, v: int) -> str:
        vm, idx, cpu = self.state.vcpu(v)
        return f"<vcpu {vm}/{idx} cpu={cpu}>"

    def flush_overhead_us(self) -> np.ndarray:
        """Engine.flush_overhead_us. The compiled state gives its counters only in result(),
        which closes the open intervals, so this asks a copy of the state (~20 µs at 64 pCPUs)."""
        return self.state.copy().result(self.sim_ns)[1][_FLUSH_OVERHEAD]

    def result(self, end_ns: int | None = None) -> dict:
        """hvmodel.metrics.Metrics.result(), from the compiled state; call once, at the end
        (`end_ns` as in Engine.result)."""
        cnt, flt, vmc, stale_kind, stale_any, ex = self.state.result(self.sim_ns if end_ns is None else end_ns)
        vm = dict(zip(REPLICATED, vmc, strict=True))
        vm["events"] = self.events
        examples = []
        for row in ex.tolist():
            e = dict(zip(_engine.EXAMPLE_FIELDS, row, strict=True))
            e["kind"], e["mmu"], e["hpa"] = list(HAZARDS)[e["kind"]], MMU_NAMES[e["mmu"]], hex(e["hpa"])
            examples.append({k: e[k] for k in EXAMPLE_KEYS})
        return {
            "per_cpu": {**dict(zip(PER_CPU_COUNTERS, cnt, strict=True)), **dict(zip(PER_CPU_FLOATS, flt, strict=True))},
            "vm": vm,
            "stale_by_kind": dict(zip(HAZARDS, stale_kind, strict=True)),
            "stale_any_kind": dict(zip(HAZARDS, stale_any, strict=True)),
            "examples": examples,
        }

    def run(self, trace: Trace) -> dict:
        for chunk in trace:
            self.replay(chunk, trace)
        return self.result(trace.duration_ns)
