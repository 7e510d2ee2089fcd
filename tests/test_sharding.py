"""Exact sharding: the merged result of N shards equals the 1-shard result, key for key and
pCPU for pCPU (DESIGN.md §3), whether the shards split the VMs (pinned VMs: each shard replays
its own nodes' VMs, and B's broadcasts cross between them) or all replay every VM (unpinned
vCPUs span nodes). Shards run here in this process (run_in_process), without Ray."""

import numpy as np
import pytest

from hvmodel.errors import ShardingError
from hvmodel.host import Topology
from hvmodel.metrics import merge
from hvmodel.split import VmNodes
from hvmodel.strategies.active_roots import ActiveRoots
from hvmodel.strategies.hyperv_flush_hypercall import HypervFlushHypercall
from hvmodel.strategies.ipi_all_on_alloc import IpiAllOnAlloc
from hvmodel.strategies.per_root_cpumask import PerRootCpumask
from hvmodel.strategies.per_root_cpumask_clear import PerRootCpumaskClear
from hvmodel.strategies.root_generation import RootGeneration
from hvmodel.strategies.upstream import Upstream
from hvmodel.strategies.vm_ever_ran_mask import VmEverRanMask
from hvmodel.trace import EVENT_DTYPE, Ev, pack_vm_create, save_binary
from hvmodel.workloads.overcommit import Overcommit
from hvmodel.workloads.partitioned_pinned import PartitionedPinned
from hvmodel.workloads.rt_mixed import RtMixed
from hvmodel.workloads.trace_file import TraceFile
from orchestrator.scenario import Scenario
from orchestrator.sharding import ShardRunner, run_in_process, shard_plan

from readings import READINGS

BARE = Topology(nr_cpus=32, numa_nodes=4, smt=2, housekeeping_per_node=1, name="t32")
HYPERV = Topology(nr_cpus=32, numa_nodes=4, smt=2, housekeeping_per_node=1, env="hyperv", name="t32hv")
CHURN = {"lifetime_s": 0.15, "zap_per_s": 40.0, "boot_s": 0.05, "reboot_fraction": 0.3}
WORKLOADS = {
    "partitioned_pinned": lambda: PartitionedPinned(duration_s=0.3, halt_per_s=100, lifecycle=CHURN),
    # shards' events densely interleaved: a broadcast delivered a few events off changes kicks
    "partitioned_pinned_dense": lambda: PartitionedPinned(duration_s=0.3, halt_per_s=3000, halt_us=30, lifecycle=CHURN),
    # vCPUs float over every node: migrations, VMCLEAR IPIs and kicks cross shard boundaries
    "overcommit_nested": lambda: Overcommit(duration_s=0.3, cpuset="all", vms=12, nested_fraction=0.5, lifecycle=CHURN),
    "rt_mixed": lambda: RtMixed(duration_s=0.3, rt={"fill": 0.5, "lifecycle": CHURN}, best_effort={"vms": 6, "lifecycle": CHURN}),
}
STRATEGIES = [Upstream, IpiAllOnAlloc, VmEverRanMask, ActiveRoots, PerRootCpumask, PerRootCpumaskClear, RootGeneration, *READINGS]


def run_plan(scenario: Scenario, shards: int) -> dict:
    return run_in_process(scenario, shards)


def assert_identical(a: dict, b: dict) -> None:
    assert a["vm"] == b["vm"]
    assert a["stale_by_kind"] == b["stale_by_kind"] and a["stale_any_kind"] == b["stale_any_kind"]
    assert a["examples"] == b["examples"]
    assert a["per_cpu"].keys() == b["per_cpu"].keys()
    for key in a["per_cpu"]:
        assert np.array_equal(a["per_cpu"][key], b["per_cpu"][key]), key


def test_shard_plan_balances_whole_nodes():
    assert shard_plan(4, 1) == [[0, 1, 2, 3]]
    assert shard_plan(4, 3) == [[0, 1], [2], [3]]
    assert shard_plan(32, 3) == [list(range(0, 11)), list(range(11, 22)), list(range(22, 32))]
    assert shard_plan(2, 8) == [[0], [1]]  # never more shards than nodes


def test_pinned_vms_are_split_and_floating_ones_replicated():
    assert Scenario(BARE, WORKLOADS["partitioned_pinned"](), Upstream(), *_defaults(), seed=7).node_local()
    for name in ("overcommit_nested", "rt_mixed"):
        assert not Scenario(BARE, WORKLOADS[name](), Upstream(), *_defaults(), seed=7).node_local(), name


def test_vm_nodes_small_ids_and_large_ones():
    """Small VM ids are looked up in an array, large ones in a dict: either way an event gets its
    VM's node from that VM's vm_create, -1 before it, and a VM created again elsewhere is refused."""
    big = VmNodes.DENSE + 5

    def chunk(*events):
        return np.array([(0, kind, vm, 0, -1, arg) for kind, vm, arg in events], EVENT_DTYPE)

    vms = VmNodes()
    assert vms.of(chunk((Ev.VM_ENTRY, 3, 0), (Ev.VM_ENTRY, big, 0))).tolist() == [-1, -1]
    created = chunk((Ev.VM_CREATE, 3, pack_vm_create(1, node=2)), (Ev.VM_CREATE, big, pack_vm_create(1, node=1)))
    assert vms.of(created).tolist() == [2, 1]
    assert vms.of(chunk((Ev.VM_ENTRY, 3, 0), (Ev.VM_ENTRY, 4, 0))).tolist() == [2, -1]  # the array path
    assert vms.of(chunk((Ev.VM_ENTRY, big, 0), (Ev.VM_ENTRY, 3, 0))).tolist() == [1, 2]  # the dict path
    with pytest.raises(ShardingError, match="VM 3 is created again"):
        vms.of(chunk((Ev.VM_CREATE, 3, pack_vm_create(1, node=0))))


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_sharded_equals_unsharded(workload, strategy):
    scenario = Scenario(BARE, WORKLOADS[workload](), strategy(), None, None, seed=7)
    scenario.cost, scenario.noise = _defaults()
    whole = run_plan(scenario, 1)
    assert whole["vm"]["events"] > 1000
    for shards in (2, 3, 4):
        assert_identical(run_plan(scenario, shards), whole)


@pytest.mark.parametrize("strategy", [Upstream, PerRootCpumask, HypervFlushHypercall], ids=lambda s: s.name)
def test_sharded_equals_unsharded_on_hyperv(strategy):
    scenario = Scenario(HYPERV, WORKLOADS["overcommit_nested"](), strategy(), *_defaults(), seed=3)
    whole = run_plan(scenario, 1)
    assert whole["vm"]["hv_flush_hypercalls"] > 0
    for shards in (2, 4):
        assert_identical(run_plan(scenario, shards), whole)


def test_the_exactness_check_can_fail():
    """Shards that disagree on VM-level counters are reported, not silently merged."""
    scenario = Scenario(BARE, WORKLOADS["partitioned_pinned"](), Upstream(), *_defaults(), seed=1)
    a = ShardRunner(scenario, [0, 1]).run()
    b = ShardRunner(Scenario(BARE, WORKLOADS["partitioned_pinned"](), Upstream(), *_defaults(), seed=2), [2, 3]).run()
    with pytest.raises(AssertionError, match="shards disagree"):
        merge([a, b])


def _defaults():
    from hvmodel.cost import CostModel
    from hvmodel.metrics import NoiseBudget

    return CostModel(), NoiseBudget()


@pytest.mark.parametrize("strategy", [Upstream, IpiAllOnAlloc, PerRootCpumask], ids=lambda s: s.name)
def test_node_local_trace_file_is_split_too(tmp_path, strategy):
    """A saved trace of pinned VMs is split by its VMs' nodes (each event's index in the file as
    its order key); one of unpinned VMs is replayed whole by every shard."""
    pinned, floating = tmp_path / "pinned.hvt", tmp_path / "floating.hvt"
    save_binary(WORKLOADS["partitioned_pinned_dense"]().trace(BARE, 3), pinned)
    save_binary(WORKLOADS["overcommit_nested"]().trace(BARE, 3), floating)
    for path, local in ((pinned, True), (floating, False)):
        scenario = Scenario(BARE, TraceFile(str(path)), strategy(), *_defaults(), seed=0)
        assert scenario.node_local() == local
        whole = run_plan(scenario, 1)
        for shards in (2, 4):
            assert_identical(run_plan(scenario, shards), whole)
