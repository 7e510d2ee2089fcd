"""The bytes of generated traces, pinned per (workload, host, seed).

A change that alters a digest must bump GENERATOR_VERSION (hvmodel/workloads/base.py) and update
the digests here: saved traces and recorded results name the generator version that made them.
Version 2 made partitioned_pinned (and rt_mixed's RT side) one stream per NUMA node; the
overcommit digests were unchanged from version 1. Version 3 calibrated the defaults to real hosts
(halts, wake affinity, guest TLB flush requests) and writes why a vCPU was put (halt, preempted).
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
DIGESTS_VERSION = 3
DIGESTS = {
    ("partitioned_pinned", "x16", 0): "e68dbbc28286ff80430ce5467d6baf8c48a00d41604a5ad65adb607a60d33b94",
    ("partitioned_pinned", "x16", 1): "aae60bcfcc74fa787c64a8113581b43edf5a250c597195484a0ffb77e6dc2970",
    ("partitioned_pinned", "t32", 0): "247c6414edd7e387aaa885fad8240f8f1dddcedc482a3a719f5f074cfa28f94e",
    ("partitioned_pinned", "t32", 1): "c3e50eef71fcaf2fee1083a5f2f902d3e39fa1d4acedaa058f01aa3950a16ffd",
    ("overcommit", "x16", 0): "b2a55d7b13ea484193258f1077b9b389ddd9ad536dc89e8b768bc593276966da",
    ("overcommit", "x16", 1): "0b0bd405ce16803b46ba7f59f6e0edea5203cdc6fde81de09d5677cb2c3ce573",
    ("overcommit", "t32", 0): "ec4840de8203e26d7324f407b67cfc1a8bb8f5d81f0083443967b0f06eb394a2",
    ("overcommit", "t32", 1): "a0b642cf00d65fe8dce81e34090dca49e43a971d5a1e307d82082e4b2e58b3fb",
    ("rt_mixed", "x16", 0): "1a1cdad576f56afd5f63341d4e369958e4238429861272c184fb5e376841411f",
    ("rt_mixed", "x16", 1): "3f1a26c815e9b123b86315fbd49f75b34cd5ebee11a2689477630b0b3ccefa08",
    ("rt_mixed", "t32", 0): "79db41986f3b40aaa67ed8285b1d6f24da80257c57006edf77dc3e868fa7d05d",
    ("rt_mixed", "t32", 1): "ccbaa9b7fb0d89f14e17cdcf4f4012f7fe919601c783aa5ebe669cc91410e111",
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
