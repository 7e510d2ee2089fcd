"""Workload generators: valid, deterministic, chunk-independent traces with the placement each
workload promises."""

import numpy as np
import pytest

from hvmodel.engine import Engine
from hvmodel.errors import ConfigError
from hvmodel.host import Topology
from hvmodel.strategies.upstream import Upstream
from hvmodel.trace import Ev
from hvmodel.workloads.overcommit import Overcommit
from hvmodel.workloads.partitioned_pinned import PartitionedPinned
from hvmodel.workloads.rt_mixed import BEST_EFFORT_VM_BASE, RtMixed

HOSTS = [
    Topology(nr_cpus=16, smt=2, housekeeping_per_node=1, name="x16"),
    Topology(nr_cpus=32, numa_nodes=4, smt=2, housekeeping_per_node=2, name="t32"),
]
CHURN = {"lifetime_s": 0.2, "zap_per_s": 30.0, "boot_s": 0.05, "reboot_fraction": 0.5}
NESTED = {"transitions_per_s": 400.0, "invept_prob": 0.3, "ept12_write_prob": 0.3}
MAKERS = {
    "partitioned_pinned": lambda chunk=1 << 16: PartitionedPinned(duration_s=0.6, halt_per_s=200, lifecycle=CHURN, chunk_events=chunk),
    "overcommit": lambda chunk=1 << 16: Overcommit(
        duration_s=0.6, cpuset="all", vms=10, nested_fraction=0.7, nested=NESTED, lifecycle=CHURN, chunk_events=chunk
    ),
    "overcommit_no_ept12": lambda chunk=1 << 16: Overcommit(
        duration_s=0.6, vms=6, nested_fraction=1.0, nested={**NESTED, "nested_ept": False}, lifecycle=CHURN, chunk_events=chunk
    ),
    "rt_mixed": lambda chunk=1 << 16: RtMixed(
        duration_s=0.6,
        rt={"fill": 0.5, "lifecycle": CHURN},
        best_effort={"vms": 5, "nested_fraction": 0.5, "lifecycle": CHURN},
        chunk_events=chunk,
    ),
}


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("topo", HOSTS, ids=lambda t: t.name)
def test_traces_replay_cleanly_over_many_seeds(name, topo):
    """The generator tracks the host state it creates (who is loaded, in L2, in SMM) so that
    every event is possible; the emulator raises TraceError otherwise."""
    kinds = set()
    for seed in range(6):
        trace = MAKERS[name]().trace(topo, seed)
        events = trace.to_array()
        assert np.all(np.diff(events["time_ns"]) >= 0)
        Engine(topo, Upstream()).run(trace)
        kinds |= set(events["kind"].tolist())
    expected = {Ev.VM_CREATE, Ev.VCPU_LOAD, Ev.VM_ENTRY, Ev.VCPU_PUT, Ev.ZAP, Ev.MEMSLOT_DELETE, Ev.SMM_ENTER, Ev.VM_DESTROY}
    if name.startswith("overcommit"):
        expected |= {Ev.NESTED_VMENTER, Ev.NESTED_VMEXIT, Ev.L1_INVEPT}
    assert expected <= kinds


@pytest.mark.parametrize("name", MAKERS)
def test_deterministic_and_chunk_independent(name):
    topo = HOSTS[1]
    a = MAKERS[name]().trace(topo, 11).to_array()
    b = np.concatenate(list(MAKERS[name](chunk=97).trace(topo, 11)))
    assert np.array_equal(a, b)
    assert max(len(c) for c in MAKERS[name](chunk=97).trace(topo, 11)) <= 97 + 16  # one callback may overshoot
    assert not np.array_equal(a, MAKERS[name]().trace(topo, 12).to_array())


def vcpu_cpus(events) -> dict:
    loads = events[events["kind"] == Ev.VCPU_LOAD]
    out: dict = {}
    for vm, vcpu, cpu in zip(loads["vm"].tolist(), loads["vcpu"].tolist(), loads["pcpu"].tolist()):
        out.setdefault((vm, vcpu), set()).add(cpu)
    return out


def test_pinned_vcpus_stay_on_their_isolated_cpu():
    topo = HOSTS[1]
    events = MAKERS["partitioned_pinned"]().trace(topo, 3).to_array()
    rt, node = topo.rt_mask(), topo.node_of()
    placements = vcpu_cpus(events)
    assert all(len(cpus) == 1 for cpus in placements.values())
    for (vm, _), cpus in placements.items():
        (cpu,) = cpus
        assert rt[cpu]
        assert len({node[c] for (v, _), cs in placements.items() if v == vm for c in cs}) == 1  # one node per VM


def test_overcommit_migrates_but_never_on_vmm_cpus():
    topo = HOSTS[1]
    events = MAKERS["overcommit"]().trace(topo, 3).to_array()
    placements = vcpu_cpus(events)
    assert max(len(c) for c in placements.values()) > 3
    vmm = {int(np.flatnonzero(topo.node_of() == n)[0]) for n in range(topo.numa_nodes)}
    assert not vmm & set().union(*placements.values())


def test_rt_mixed_keeps_best_effort_off_rt_cpus():
    topo = HOSTS[1]
    events = RtMixed(duration_s=0.6, rt={"fill": 0.5}, best_effort={"vms": 6}).trace(topo, 2).to_array()
    placements = vcpu_cpus(events)
    rt_cpus = set().union(*(c for (vm, _), c in placements.items() if vm < BEST_EFFORT_VM_BASE))
    be_cpus = set().union(*(c for (vm, _), c in placements.items() if vm >= BEST_EFFORT_VM_BASE))
    assert rt_cpus and be_cpus and not rt_cpus & be_cpus
    assert all(topo.rt_mask()[c] for c in rt_cpus)


@pytest.mark.parametrize(
    "make,key",
    [
        (lambda: PartitionedPinned(vm_vcpus=(16,)), "workload.vm_vcpus"),
        (lambda: PartitionedPinned(fill=0), "workload.fill"),
        (lambda: Overcommit(cpuset="nodes"), "workload.cpuset"),
        (lambda: Overcommit(lifecycle={"reboot_fraction": 2}), "workload.lifecycle.reboot_fraction"),
        (lambda: RtMixed(rt={"cpuset": "all"}), "workload.rt.cpuset"),
        (lambda: RtMixed(best_effort={"cpuset": "all"}), "workload.best_effort.cpuset"),
    ],
)
def test_bad_parameters_name_the_key(make, key):
    with pytest.raises(ConfigError) as e:
        make().check(HOSTS[0])
    assert e.value.key == key


def test_rt_mixed_needs_a_cpu_for_best_effort():
    """One housekeeping CPU (the VMM's) and every isolated CPU pinned: nowhere left."""
    topo = Topology(nr_cpus=8, smt=1, housekeeping_per_node=1)
    with pytest.raises(ConfigError) as e:
        RtMixed(rt={"fill": 1.0}).check(topo)
    assert e.value.key == "workload.rt.fill"
    RtMixed(rt={"fill": 0.5}).check(topo)
