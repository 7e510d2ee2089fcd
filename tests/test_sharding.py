"""Exact sharding: the merged result of N shards equals the 1-shard result, key for key and
pCPU for pCPU (DESIGN.md §3). Shards run here as plain ShardRunner objects, without Ray."""

import numpy as np
import pytest

from hvmodel.host import Topology
from hvmodel.metrics import merge
from hvmodel.strategies.active_roots import ActiveRoots
from hvmodel.strategies.hyperv_flush_hypercall import HypervFlushHypercall
from hvmodel.strategies.ipi_all_on_alloc import IpiAllOnAlloc
from hvmodel.strategies.per_root_cpumask import PerRootCpumask
from hvmodel.strategies.per_root_cpumask_clear import PerRootCpumaskClear
from hvmodel.strategies.root_generation import RootGeneration
from hvmodel.strategies.upstream import Upstream
from hvmodel.strategies.vm_ever_ran_mask import VmEverRanMask
from hvmodel.workloads.overcommit import Overcommit
from hvmodel.workloads.partitioned_pinned import PartitionedPinned
from hvmodel.workloads.rt_mixed import RtMixed
from orchestrator.scenario import Scenario
from orchestrator.sharding import ShardRunner, shard_plan

BARE = Topology(nr_cpus=32, numa_nodes=4, smt=2, housekeeping_per_node=1, name="t32")
HYPERV = Topology(nr_cpus=32, numa_nodes=4, smt=2, housekeeping_per_node=1, env="hyperv", name="t32hv")
CHURN = {"lifetime_s": 0.15, "zap_per_s": 40.0, "boot_s": 0.05, "reboot_fraction": 0.3}
WORKLOADS = {
    "partitioned_pinned": lambda: PartitionedPinned(duration_s=0.3, halt_per_s=100, lifecycle=CHURN),
    # vCPUs float over every node: migrations, VMCLEAR IPIs and kicks cross shard boundaries
    "overcommit_nested": lambda: Overcommit(duration_s=0.3, cpuset="all", vms=12, nested_fraction=0.5, lifecycle=CHURN),
    "rt_mixed": lambda: RtMixed(duration_s=0.3, rt={"fill": 0.5, "lifecycle": CHURN}, best_effort={"vms": 6, "lifecycle": CHURN}),
}
STRATEGIES = [Upstream, IpiAllOnAlloc, VmEverRanMask, ActiveRoots, PerRootCpumask, PerRootCpumaskClear, RootGeneration]


def run_plan(scenario: Scenario, shards: int) -> dict:
    results = [ShardRunner(scenario, nodes).run() for nodes in shard_plan(scenario.topo.numa_nodes, shards)]
    return merge(results, scenario.max_examples)


def assert_identical(a: dict, b: dict) -> None:
    assert a["vm"] == b["vm"]
    assert a["stale_by_kind"] == b["stale_by_kind"]
    assert a["examples"] == b["examples"]
    assert a["per_cpu"].keys() == b["per_cpu"].keys()
    for key in a["per_cpu"]:
        assert np.array_equal(a["per_cpu"][key], b["per_cpu"][key]), key


def test_shard_plan_balances_whole_nodes():
    assert shard_plan(4, 1) == [[0, 1, 2, 3]]
    assert shard_plan(4, 3) == [[0, 1], [2], [3]]
    assert shard_plan(32, 3) == [list(range(0, 11)), list(range(11, 22)), list(range(22, 32))]
    assert shard_plan(2, 8) == [[0], [1]]  # never more shards than nodes


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
