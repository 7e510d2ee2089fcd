"""Workload generators: valid, deterministic, chunk-independent traces with the placement each
workload promises, generated whole or node by node."""

import numpy as np
import pytest

from hvmodel.engine import Engine
from hvmodel.errors import ConfigError
from hvmodel.host import Topology
from hvmodel.strategies.upstream import Upstream
from hvmodel.trace import Ev, unpack_vm_create
from hvmodel.workloads.base import GENERATOR_VERSION, HostCpus
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
    chunks = list(MAKERS[name](chunk=97).trace(topo, 11))
    assert all(len(c) == 97 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 97
    assert not np.array_equal(a, MAKERS[name]().trace(topo, 12).to_array())


def test_meta_records_the_generator_version():
    trace = MAKERS["overcommit"]().trace(HOSTS[1], 5)
    assert trace.meta == {"workload": "overcommit", "seed": 5, "host": "t32", "generator_version": GENERATOR_VERSION}
    assert MAKERS["partitioned_pinned"]().trace(HOSTS[1], 5, nodes=[2, 0]).meta["nodes"] == [0, 2]


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


# --- generation by NUMA node ------------------------------------------------------------------
NO_HK_ON_NODE_1 = Topology(nr_cpus=32, numa_nodes=4, smt=2, isolcpus="1-7,9-11,13-15,17-23,25-27,29-31", name="t32-1")


def node_of_vm(events, topo) -> dict[int, int]:
    """VM id -> its page node (from vm_create)."""
    creates = events[events["kind"] == Ev.VM_CREATE]
    return {int(vm): unpack_vm_create(int(arg))[2] for vm, arg in zip(creates["vm"], creates["arg"])}


def test_node_local_says_whether_every_vm_keeps_to_one_node():
    assert HostCpus(NO_HK_ON_NODE_1).housekeeping[1] == []  # node 1 borrows node 0's VMM CPU
    pinned = MAKERS["partitioned_pinned"]()
    assert pinned.node_local(HOSTS[1]) and not pinned.node_local(NO_HK_ON_NODE_1)
    assert pinned.node_local(HOSTS[0])
    for name in ("overcommit", "rt_mixed"):
        assert MAKERS[name]().node_local(HOSTS[0])  # one node: trivially
        assert not MAKERS[name]().node_local(HOSTS[1])


@pytest.mark.parametrize("topo", [HOSTS[1], Topology(nr_cpus=384, sockets=2, numa_nodes=2, smt=2, housekeeping_per_node=2, name="x384")])
def test_a_pinned_vm_keeps_to_its_node_and_its_id_says_which(topo):
    """What node_local promises: vCPUs, VMM-thread pCPU and page node of a VM on one node; and
    VM ids are 1 + node + numa_nodes * k."""
    node = topo.node_of()
    for seed in range(3):
        events = PartitionedPinned(duration_s=0.3, halt_per_s=200, lifecycle=CHURN).trace(topo, seed).to_array()
        pages = node_of_vm(events, topo)
        assert len(pages) > 2 * topo.numa_nodes
        with_pcpu = events[events["pcpu"] >= 0]
        for vm, pcpu in zip(with_pcpu["vm"].tolist(), with_pcpu["pcpu"].tolist()):
            assert node[pcpu] == pages[vm] == (vm - 1) % topo.numa_nodes
        for n in range(topo.numa_nodes):  # the k-th VM of node n
            ids = sorted(vm for vm, page in pages.items() if page == n)
            assert ids == [1 + n + topo.numa_nodes * k for k in range(len(ids))]


NODE_SETS = [[0], [3], [1, 2], [0, 3], [2, 0, 1], [0, 1, 2, 3], []]


@pytest.mark.parametrize("reference", [False, True], ids=["compiled", "reference"])
def test_nodes_gives_the_full_trace_filtered_to_their_vms(reference):
    topo = HOSTS[1]
    for seed in range(4):
        make = lambda: PartitionedPinned(duration_s=0.4, halt_per_s=200, lifecycle=CHURN, chunk_events=501)
        full = make().trace(topo, seed, reference=reference).to_array()
        for nodes in NODE_SETS[seed::2] if reference else NODE_SETS:
            part = make().trace(topo, seed, nodes=nodes, reference=reference).to_array()
            expect = full[np.isin((full["vm"] - 1) % topo.numa_nodes, nodes)]
            assert len(part) == len(expect) and np.array_equal(part, expect), (seed, nodes)


def test_nodes_on_a_one_node_host_is_all_or_nothing():
    topo = HOSTS[0]
    for name in ("overcommit", "rt_mixed", "partitioned_pinned"):
        full = MAKERS[name]().trace(topo, 4).to_array()
        assert np.array_equal(MAKERS[name]().trace(topo, 4, nodes=[0]).to_array(), full)
        assert len(MAKERS[name]().trace(topo, 4, nodes=[]).to_array()) == 0


def test_nodes_is_refused_unless_node_local():
    for make, topo in [
        (MAKERS["overcommit"], HOSTS[1]),
        (MAKERS["rt_mixed"], HOSTS[1]),
        (MAKERS["partitioned_pinned"], NO_HK_ON_NODE_1),
    ]:
        with pytest.raises(ValueError, match="not node-local"):
            make().trace(topo, 0, nodes=[0])
    with pytest.raises(ValueError, match="outside"):
        MAKERS["partitioned_pinned"]().trace(HOSTS[1], 0, nodes=[4])


@pytest.mark.parametrize("reference", [False, True], ids=["compiled", "reference"])
def test_vm_ids_that_would_collide_stop_the_generator(reference):
    """rt_mixed's RT ids must stay below BEST_EFFORT_VM_BASE; a node stream given a lower limit
    stops with an AssertionError (an internal invariant, not a configuration error)."""
    topo = HOSTS[1]
    w = PartitionedPinned(duration_s=0.6, lifecycle={**CHURN, "reboot_fraction": 0.0})
    stream = w.node_stream(HostCpus(topo), w.rng(0, 1), 1, vm_id_limit=10)  # ids 2, 6, then 10
    with pytest.raises(AssertionError, match="collide"):
        if reference:
            list(stream.events())
        else:
            stream.compiled().advance(w.duration_ns)
