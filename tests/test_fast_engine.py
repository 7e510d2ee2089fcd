"""The compiled engine against the reference: the same counters, per-pCPU arrays (floats bit for
bit) and stale examples on the same trace, for every strategy and control strategy, on bare
metal and nested on Hyper-V, for the whole host and for one shard's pCPUs."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from hvmodel.cost import CostModel
from hvmodel.engine import Engine
from hvmodel.errors import ConfigError
from hvmodel.fast.engine import FastEngine
from hvmodel.host import Topology
from hvmodel.metrics import NoiseBudget
from hvmodel.strategies.active_roots import ActiveRoots
from hvmodel.strategies.hyperv_flush_hypercall import HypervFlushHypercall
from hvmodel.strategies.ipi_all_on_alloc import IpiAllOnAlloc
from hvmodel.strategies.per_root_cpumask import PerRootCpumask
from hvmodel.strategies.per_root_cpumask_clear import PerRootCpumaskClear
from hvmodel.strategies.root_generation import RootGeneration
from hvmodel.strategies.upstream import Upstream
from hvmodel.strategies.vm_ever_ran_mask import VmEverRanMask
from hvmodel.trace import TraceError, load_text
from hvmodel.workloads.overcommit import Overcommit
from hvmodel.workloads.partitioned_pinned import PartitionedPinned
from hvmodel.workloads.rt_mixed import RtMixed

from controls import CurrentRootOnly, NoMigrationFlush, RootMmuOnly
from readings import READINGS
from tracegen import ACTIONS, CACHED, HYPERV, TOPO, build_trace

BARE_METAL = [Upstream, IpiAllOnAlloc, VmEverRanMask, ActiveRoots, PerRootCpumask, PerRootCpumaskClear, RootGeneration, *READINGS]
CONTROLS = [NoMigrationFlush, CurrentRootOnly, RootMmuOnly]
TRACES = sorted((Path(__file__).parent / "traces").glob("*.jsonl"))


def strategies_for(topo: Topology) -> list:
    return BARE_METAL + CONTROLS + ([HypervFlushHypercall] if topo.env == "hyperv" else [])


def differences(ref: dict, fast: dict) -> list[str]:
    """Every field in which two raw results differ (empty if they are identical)."""
    diff = [k for k in ("vm", "stale_by_kind", "stale_any_kind", "examples") if ref[k] != fast[k]]
    if ref["per_cpu"].keys() != fast["per_cpu"].keys():
        return [*diff, "per_cpu keys"]
    return diff + [k for k in ref["per_cpu"] if not np.array_equal(ref["per_cpu"][k], fast["per_cpu"][k])]


def assert_same(trace, topo: Topology, strategy, **kwargs) -> dict:
    ref = Engine(topo, strategy(), **kwargs).run(trace)
    fast = FastEngine(topo, strategy(), **kwargs).run(trace)
    assert not differences(ref, fast), f"{strategy.name} on {topo.name}: {differences(ref, fast)}"
    return ref


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=ACTIONS)
def test_random_traces_give_identical_results(actions):
    """300 random valid traces x every strategy and control x both environments (and bare metal
    with page_reuse=cached) x the whole host and one NUMA node's pCPUs."""
    trace = build_trace(actions)
    for topo in (TOPO, HYPERV, CACHED):
        for strategy in strategies_for(topo):
            for owned in (None, [1]):
                assert_same(trace, topo, strategy, owned_nodes=owned)


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.stem)
@pytest.mark.parametrize("env", ["bare_metal", "hyperv"])
def test_hand_written_traces_give_identical_results(path, env):
    trace = load_text(path)
    topo = Topology(nr_cpus=8, smt=1, housekeeping_per_node=1, env=env, name="t8")
    for strategy in strategies_for(topo):
        assert_same(trace, topo, strategy)


CHURN = {"lifetime_s": 0.2, "zap_per_s": 30.0, "boot_s": 0.05, "reboot_fraction": 0.5}
NESTED = {"invept_prob": 0.3, "ept12_write_prob": 0.3}
WORKLOADS = {
    "partitioned_pinned": lambda: PartitionedPinned(duration_s=0.3, halt_per_s=200, lifecycle=CHURN),
    "overcommit": lambda: Overcommit(duration_s=0.3, cpuset="all", vms=10, nested_fraction=0.7, nested=NESTED, lifecycle=CHURN),
    "overcommit_tdp_l2": lambda: Overcommit(duration_s=0.3, vms=6, nested_fraction=1.0, nested={**NESTED, "nested_ept": False}),
    "rt_mixed": lambda: RtMixed(duration_s=0.3, rt={"fill": 0.5, "lifecycle": CHURN}, best_effort={"vms": 5, "lifecycle": CHURN}),
    "nested_kata": lambda: Overcommit(duration_s=0.3, cpuset="all", vms=40, vm_vcpus=(1, 2), lifecycle={"lifetime_s": 0.2}),
}
HOSTS = {
    "x16": Topology(nr_cpus=16, smt=2, housekeeping_per_node=1, name="x16"),
    "x64": Topology(nr_cpus=64, smt=2, housekeeping_per_node=2, env="hyperv", name="x64"),
    "x384": Topology(nr_cpus=384, sockets=2, numa_nodes=2, smt=2, housekeeping_per_node=2, name="x384"),
}


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("host", HOSTS)
def test_workloads_give_identical_results(workload, host):
    topo = HOSTS[host]
    trace = WORKLOADS[workload]().trace(topo, 1)
    costs = CostModel(refill_us=77.3, ipi_send_us=0.37)  # values that are not exact in binary
    for strategy in strategies_for(topo):
        for owned in (None, [topo.numa_nodes - 1]):
            assert_same(trace, topo, strategy, owned_nodes=owned, cost=costs, noise=NoiseBudget(period_us=50_000, budget_us=3.0))


@pytest.mark.parametrize(
    "events",
    [
        [{"event": "vm_entry", "vm": 1, "vcpu": 0}],
        [{"event": "vm_create", "vm": 1, "vcpus": 1}, {"event": "vm_entry", "vm": 1, "vcpu": 0}],
        [{"event": "vm_create", "vm": 1, "vcpus": 1}, {"event": "vm_create", "vm": 1, "vcpus": 2}],
        [{"event": "vm_create", "vm": 1, "vcpus": 1, "node": 3}],
        [{"event": "vm_create", "vm": 1, "vcpus": 1}, {"event": "vcpu_load", "vm": 1, "vcpu": 2, "pcpu": 1}],
        [
            {"event": "vm_create", "vm": 1, "vcpus": 2},
            {"event": "vcpu_load", "vm": 1, "vcpu": 0, "pcpu": 1},
            {"event": "vcpu_load", "vm": 1, "vcpu": 1, "pcpu": 1},
        ],  # fmt: skip
        [
            {"event": "vm_create", "vm": 1, "vcpus": 1},
            {"event": "vcpu_load", "vm": 1, "vcpu": 0, "pcpu": 1},
            {"event": "vm_entry", "vm": 1, "vcpu": 0},
            {"event": "zap", "vm": 1, "pcpu": 1},
        ],  # fmt: skip
        [{"event": "vm_create", "vm": 1, "vcpus": 1}, {"event": "vcpu_load", "vm": 1, "vcpu": 0, "pcpu": 9}],
        [
            {"event": "vm_create", "vm": 1, "vcpus": 1},
            {"event": "vcpu_load", "vm": 1, "vcpu": 0, "pcpu": 1},
            {"event": "vm_destroy", "vm": 1},
        ],  # fmt: skip
        [
            {"event": "vm_create", "vm": 1, "vcpus": 1},
            {"event": "vcpu_load", "vm": 1, "vcpu": 0, "pcpu": 1},
            {"event": "smm_exit", "vm": 1, "vcpu": 0},
        ],  # fmt: skip
        [
            {"event": "vm_create", "vm": 1, "vcpus": 1},
            {"event": "vcpu_load", "vm": 1, "vcpu": 0, "pcpu": 1},
            {"event": "nested_vmexit", "vm": 1, "vcpu": 0},
        ],  # fmt: skip
        [
            {"event": "vm_create", "vm": 1, "vcpus": 1},
            {"event": "vcpu_load", "vm": 1, "vcpu": 0, "pcpu": 1},
            {"event": "nested_vmenter", "vm": 1, "vcpu": 0, "l2": 3},
            {"event": "l1_invept", "vm": 1, "vcpu": 0},
        ],  # fmt: skip
        [{"event": "vm_create", "vm": 1, "vcpus": 1}, {"event": "smm_enter", "vm": 1, "vcpu": 0}],
    ],
)
def test_trace_errors_give_the_same_message(tmp_path, events):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"t_ns": 10 * i, **e}) + "\n" for i, e in enumerate(events)))
    topo = Topology(nr_cpus=4, smt=1, housekeeping_per_node=1)
    messages = []
    for engine in (Engine, FastEngine):
        with pytest.raises(TraceError) as e:
            engine(topo, Upstream()).run(load_text(path))
        messages.append(str(e.value))
    assert messages[0] == messages[1]


def test_the_comparison_sees_a_different_strategy():
    """E and E' differ only after a remote flush of a VM whose pCPUs moved: on such a trace the
    comparison must report the difference (stale uses, INVEPTs)."""
    trace = load_text(Path(__file__).parent / "traces" / "h4_remote_flush.jsonl")
    topo = Topology(nr_cpus=4, smt=1, housekeeping_per_node=1)
    ref = Engine(topo, PerRootCpumask()).run(trace)
    fast = FastEngine(topo, PerRootCpumaskClear()).run(trace)
    assert {"stale_by_kind", "stale_tlb_uses", "invept_single"} <= set(differences(ref, fast))


def test_a_strategy_with_no_compiled_version_is_refused():
    class Tweaked(PerRootCpumask):
        def needs_flush(self, sp, cpu):
            return True

    with pytest.raises(ConfigError, match="changes needs_flush of PerRootCpumask"):
        FastEngine(TOPO, Tweaked())


def test_an_engine_built_from_other_sources_is_refused(monkeypatch):
    """No silent fallback: an extension whose built-in source digest is not the sources' fails to
    import (and so would `engine=fast`), with the command that rebuilds it."""
    import hvmodel.fast.digest as digest

    monkeypatch.setattr(digest, "source_digest", lambda: "0000")
    monkeypatch.delitem(sys.modules, "hvmodel.fast.engine")
    with pytest.raises(ImportError, match="rebuild"):
        importlib.import_module("hvmodel.fast.engine")
