"""The compiled generators against their Python reference: the same chunks, byte for byte, over
many seeds, hosts, parameter sets and chunk sizes (the reference is the specification)."""

import numpy as np
import pytest

from hvmodel.host import Topology
from hvmodel.trace import EVENT_DTYPE, Ev
from hvmodel.workloads import base, overcommit, partitioned_pinned
from hvmodel.workloads.overcommit import Overcommit
from hvmodel.workloads.partitioned_pinned import PartitionedPinned
from hvmodel.workloads.rt_mixed import RtMixed

X16 = Topology(nr_cpus=16, smt=2, housekeeping_per_node=1, name="x16")
T32 = Topology(nr_cpus=32, numa_nodes=4, smt=2, housekeeping_per_node=2, name="t32")
X64 = Topology(nr_cpus=64, smt=2, housekeeping_per_node=2, env="hyperv", name="x64")
X384 = Topology(nr_cpus=384, sockets=2, numa_nodes=2, smt=2, housekeeping_per_node=2, name="x384")
HOSTS = {t.name: t for t in (X16, T32, X64, X384)}

CHURN = {"lifetime_s": 0.15, "zap_per_s": 30.0, "boot_s": 0.05, "reboot_fraction": 0.5, "respawn_s": 0.0}
NESTED = {"transitions_per_s": 500.0, "invept_prob": 0.3, "ept12_write_prob": 0.3}
# name -> (hosts, make(chunk_events)); durations keep the reference run short on the big host
CASES = {
    "pinned": (["x16", "t32", "x64", "x384"], lambda c: PartitionedPinned(duration_s=0.3, halt_per_s=150, lifecycle=CHURN, chunk_events=c)),
    "pinned_defaults": (["t32", "x384"], lambda c: PartitionedPinned(duration_s=0.4, chunk_events=c)),
    "pinned_sparse": (  # big VMs, a partly filled node, no halts, five-level EPT, no firmware steps
        ["x64", "x384"],
        lambda c: PartitionedPinned(
            duration_s=0.5,
            vm_vcpus=(3, 8),
            fill=0.6,
            halt_per_s=0.0,
            lifecycle={"tdp_level": 5, "boot_smm_transitions": 0, "boot_memslot_deletes": 0, "lifetime_s": 0.1, "zap_per_s": 0},
            chunk_events=c,
        ),
    ),
    "overcommit_nested_ept": (
        ["x16", "t32", "x64", "x384"],
        lambda c: Overcommit(duration_s=0.4, cpuset="all", vms=12, nested_fraction=0.7, nested=NESTED, lifecycle=CHURN, chunk_events=c),
    ),
    "overcommit_nested_no_ept": (
        ["x16", "t32", "x384"],
        lambda c: Overcommit(
            duration_s=0.4, vms=8, nested_fraction=1.0, nested={**NESTED, "nested_ept": False}, lifecycle=CHURN, chunk_events=c
        ),
    ),
    "overcommit_crowded": (  # many more vCPUs than pCPUs: the run queue is long; no wake affinity
        ["x16", "t32"],
        lambda c: Overcommit(
            duration_s=0.3, cpuset="housekeeping", vms=20, vm_vcpus=(1, 2, 4), wake_affinity=0.0, lifecycle=CHURN, chunk_events=c
        ),
    ),
    "kata": (  # nested_kata's shape: short-lived small VMs on every CPU, always replaced
        ["x64"],
        lambda c: Overcommit(
            duration_s=0.4,
            cpuset="all",
            vms=60,
            vm_vcpus=(1, 2),
            run_ms=10.0,
            sleep_ms=5.0,
            wake_affinity=1.0,
            lifecycle={"boot_s": 0.1, "zap_per_s": 5.0, "lifetime_s": 0.3, "reboot_fraction": 0.0},
            chunk_events=c,
        ),
    ),
    "rt_mixed": (
        ["x16", "t32", "x64", "x384"],
        lambda c: RtMixed(
            duration_s=0.3,
            rt={"fill": 0.5, "halt_per_s": 150, "lifecycle": CHURN},
            best_effort={"vms": 6, "nested_fraction": 0.5, "nested": NESTED, "lifecycle": CHURN},
            chunk_events=c,
        ),
    ),
}
SEEDS = range(20)
CHUNKS = (1 << 16, 1000, 37)


def chunks(make, topo, seed, chunk_events, reference):
    return list(make(chunk_events).trace(topo, seed, reference=reference))


def assert_same(fast: list, ref: list) -> None:
    assert [len(c) for c in fast] == [len(c) for c in ref]
    for k, (a, b) in enumerate(zip(fast, ref)):
        assert a.dtype == b.dtype == EVENT_DTYPE
        if a.tobytes() != b.tobytes():
            i = int(np.flatnonzero(a != b)[0])
            pytest.fail(f"chunk {k} differs first at event {i}: compiled {a[i]} reference {b[i]}")


@pytest.mark.parametrize("case,host", [(case, host) for case, (hosts, _) in CASES.items() for host in hosts])
def test_compiled_equals_reference(case, host):
    make, topo = CASES[case][1], HOSTS[host]
    total = 0
    for seed in SEEDS:
        chunk_events = CHUNKS[seed % len(CHUNKS)]
        ref = chunks(make, topo, seed, chunk_events, reference=True)
        assert_same(chunks(make, topo, seed, chunk_events, reference=False), ref)
        total += sum(map(len, ref))
    assert total > 20 * len(SEEDS)


def test_the_cases_exercise_every_event_kind():
    kinds = set()
    for hosts, make in CASES.values():
        for host in hosts:
            kinds |= set(make(1 << 16).trace(HOSTS[host], 1).to_array()["kind"].tolist())
    assert kinds == set(Ev) - {Ev.MMU_RESET_CONTEXT}  # the generators never emit it


def test_node_subsets_of_compiled_and_reference_agree():
    _, make = CASES["pinned"]
    for seed in range(5):
        for nodes in ([1], [0, 2], [3, 1, 2]):
            a = make(500).trace(T32, seed, nodes=nodes).to_array()
            b = make(500).trace(T32, seed, nodes=nodes, reference=True).to_array()
            assert np.array_equal(a, b)


def test_growing_the_buffers_keeps_the_trace(monkeypatch):
    """Start every compiled heap and output buffer with no spare room, so that they double many
    times mid-window."""
    monkeypatch.setattr(base, "OUT_EVENTS", 1)
    for module in (partitioned_pinned, overcommit):
        monkeypatch.setattr(module, "stream_fields", lambda *args: base.stream_fields(*args[:-1], 0))
    for case in ("pinned", "overcommit_nested_ept", "rt_mixed"):
        _, make = CASES[case]
        assert_same(chunks(make, T32, 3, 1000, reference=False), chunks(make, T32, 3, 1000, reference=True))


def test_merge_runs_orders_by_time_then_run():
    rng = np.random.default_rng(0)
    runs = []
    for r in range(5):
        run = np.zeros(int(rng.integers(0, 300)), EVENT_DTYPE)
        run["time_ns"] = np.sort(rng.integers(1000, 1100, len(run)))  # many equal times across runs
        run["vm"], run["arg"] = r, np.arange(len(run))
        runs.append(run)
    left = np.zeros(3, EVENT_DTYPE)
    left["time_ns"] = [5, 7, 7]
    expect = np.concatenate([left, *runs])
    expect = expect[np.argsort(expect["time_ns"], kind="stable")]
    assert np.array_equal(base.merge_runs(left, runs), expect)
    runs[2]["time_ns"] += 1 << 56  # too long a span to pack with the positions: the fallback sort
    expect = np.concatenate([left, *runs])
    assert np.array_equal(base.merge_runs(left, runs), expect[np.argsort(expect["time_ns"], kind="stable")])
