"""The bytes of generated traces, pinned per (workload, host, seed).

A change that alters a digest must bump GENERATOR_VERSION (hvmodel/workloads/base.py) and update
the digests here: saved traces and recorded results name the generator version that made them.
Version 2 made partitioned_pinned (and rt_mixed's RT side) one stream per NUMA node; the
overcommit digests were unchanged from version 1. Version 3 calibrated the defaults to real hosts
(halts, wake affinity, guest TLB flush requests), writes why a vCPU was put (halt, preempted),
sets need_resched before a preemption and floods some EPT12 writes.
"""

import hashlib
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hvmodel.host import Topology
from hvmodel.trace import Ev
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
    ("overcommit", "x16", 0): "d5a90dcf74cc273064f104c81679d6e3d01f1a6b0c937f5b6740112a35231cd3",
    ("overcommit", "x16", 1): "44ff1a998de1559a09a94489750ec0b390c72596db46eaabc1c06e653d0f28c8",
    ("overcommit", "t32", 0): "d40ea3ab9925b35dbe143606d6a8fffe61aefb6a588eb11c8281b7676d4753f0",
    ("overcommit", "t32", 1): "ac803c52955a9dd6f247844ad93c3e7c5238f17f939b6907ba90c9b82771c001",
    ("rt_mixed", "x16", 0): "1a1cdad576f56afd5f63341d4e369958e4238429861272c184fb5e376841411f",
    ("rt_mixed", "x16", 1): "37914a791e9de4c792ed050d82b7f8b4992c52204c6cba13c5feddc566e7dae5",
    ("rt_mixed", "t32", 0): "79db41986f3b40aaa67ed8285b1d6f24da80257c57006edf77dc3e868fa7d05d",
    ("rt_mixed", "t32", 1): "ccbaa9b7fb0d89f14e17cdcf4f4012f7fe919601c783aa5ebe669cc91410e111",
}

# version 2's partitioned_pinned digests (seed 0), which the light preset keeps
V2_PINNED = {
    "x16": "8ea85274bf287b0de8bd679431b896740e713517be2103cd2d95ec8e9b134681",
    "t32": "46b64cb67cf80ebaf45461551a49b440eb6cc0d39d9e28c4b5b043ac5b4e139d",
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


@pytest.mark.parametrize("host,digest", [("x16", V2_PINNED["x16"]), ("t32", V2_PINNED["t32"])])
def test_light_preset_is_version_2_but_for_the_put_reason(host, digest):
    """conf/workload/partitioned_pinned_light.yaml reproduces version 2's partitioned_pinned traces
    (the ones docs/performance.md measured), with vcpu_put's reason zeroed."""
    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "workload" / "partitioned_pinned_light.yaml")
    cfg.duration_s = 0.3
    cfg.lifecycle = OmegaConf.merge(cfg.lifecycle, CHURN)
    h = hashlib.sha256()
    for chunk in instantiate(cfg).trace(HOSTS[host], 0):
        chunk = chunk.copy()
        chunk["arg"][chunk["kind"] == Ev.VCPU_PUT] = 0
        h.update(chunk.tobytes())
    assert h.hexdigest() == digest
