"""The bytes of generated traces, pinned per (workload, host, seed).

A change that alters a digest must bump GENERATOR_VERSION (hvmodel/workloads/base.py) and update
the digests here: saved traces and recorded results name the generator version that made them.
Version 2 made partitioned_pinned (and rt_mixed's RT side) one stream per NUMA node; the
overcommit digests are unchanged from version 1.
"""

import hashlib

import pytest

from hvmodel.host import Topology
from hvmodel.workloads.base import GENERATOR_VERSION
from hvmodel.workloads.overcommit import Overcommit
from hvmodel.workloads.partitioned_pinned import PartitionedPinned
from hvmodel.workloads.rt_mixed import RtMixed

HOSTS = {
    "x16": Topology(nr_cpus=16, smt=2, housekeeping_per_node=1, name="x16"),
    "t32": Topology(nr_cpus=32, numa_nodes=4, smt=2, housekeeping_per_node=2, name="t32"),
}
CHURN = {"lifetime_s": 0.2, "zap_per_s": 20.0, "boot_s": 0.05}
WORKLOADS = {
    "partitioned_pinned": lambda: PartitionedPinned(duration_s=0.3, lifecycle=CHURN),
    "overcommit": lambda: Overcommit(duration_s=0.3, cpuset="all", vms=6, nested_fraction=0.5, lifecycle=CHURN),
    "rt_mixed": lambda: RtMixed(duration_s=0.3, rt={"fill": 0.5, "lifecycle": CHURN}, best_effort={"vms": 4, "lifecycle": CHURN}),
}
DIGESTS_VERSION = 2
DIGESTS = {
    ("partitioned_pinned", "x16", 0): "8ea85274bf287b0de8bd679431b896740e713517be2103cd2d95ec8e9b134681",
    ("partitioned_pinned", "x16", 1): "4bb054e2f5f31d36cdcd5796ab0b3f005c17b53a7c1a77f5ad40c539813f11ec",
    ("partitioned_pinned", "t32", 0): "46b64cb67cf80ebaf45461551a49b440eb6cc0d39d9e28c4b5b043ac5b4e139d",
    ("partitioned_pinned", "t32", 1): "e8da03ba8da1c2b964ba428a416d8a64d8b7af724cd054c7f9ad7dc006641ef3",
    ("overcommit", "x16", 0): "d9a4134779365dfd52bb9ad933984e341ff2e6e7ee85011a5dc6efa6ae135154",
    ("overcommit", "x16", 1): "03cea4ecedb97a5cd3c6105fe8f9f36260f3b17efe0344334556418742653295",
    ("overcommit", "t32", 0): "ac6385b42d999d21dddb6a254f0241c6db2247e1490e621ed9a96da9b261b249",
    ("overcommit", "t32", 1): "b0fd61fd91b2fbf3ba754c23dae2c28e5ed37e7c617a138eaa526a517e6d0b39",
    ("rt_mixed", "x16", 0): "b7c9fac123802ed464fad40a557d3a01767c61f817922a35bf179c834cbe644d",
    ("rt_mixed", "x16", 1): "9eaa706f63899368c39c7339ea13a22acbf78cc3a3bcbf2aecedf36ca5bb8965",
    ("rt_mixed", "t32", 0): "04bbed80dfa329252e2245c8af3a853ff2871662942d052b5f419bc8f093c6b1",
    ("rt_mixed", "t32", 1): "32b00fae3ba50670917034499af4eb0b54148e95ef89ad011d58ef3180573ac3",
}


@pytest.mark.parametrize("workload,host,seed", DIGESTS)
def test_trace_bytes_are_pinned(workload, host, seed):
    assert GENERATOR_VERSION == DIGESTS_VERSION, "GENERATOR_VERSION changed: update DIGESTS (and DIGESTS_VERSION)"
    trace = WORKLOADS[workload]().trace(HOSTS[host], seed)
    assert trace.meta["generator_version"] == GENERATOR_VERSION
    h = hashlib.sha256()
    for chunk in trace:
        h.update(chunk.tobytes())
    assert h.hexdigest() == DIGESTS[workload, host, seed], "the trace changed: bump GENERATOR_VERSION and update DIGESTS"
