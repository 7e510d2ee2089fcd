"""trace: replay a saved trace file instead of generating one."""

from __future__ import annotations

from collections.abc import Sequence

from hvmodel.errors import ConfigError
from hvmodel.host import Topology
from hvmodel.split import node_local
from hvmodel.trace import Trace, TraceError, load
from hvmodel.workloads.base import Workload


class TraceFile(Workload):
    """Replay a saved trace (binary, or the JSON Lines text format of docs/trace-format.md)."""

    name = "trace"
    generates_by_node = False  # a file is read whole; shards keep their own VMs' events (hvmodel.split)

    def __init__(self, path: str | None = None):
        if not path:
            raise ConfigError("workload.path", "workload=trace needs workload.path=FILE")
        self.path = path
        self.duration_ns = None

    def check(self, topo: Topology) -> None:
        """Parse the file now, so a bad line, or a pCPU the host does not have, is reported
        before anything runs; the file's duration is then known (progress and ETA)."""
        trace = self.trace(topo, 0)
        top = max((int(chunk["pcpu"].max()) for chunk in trace if len(chunk)), default=-1)
        if top >= topo.nr_cpus:
            raise ConfigError(
                "workload.path",
                f"{self.path} uses pcpu {top}, but host {topo.name or topo.nr_cpus} has {topo.nr_cpus} CPUs: pick a bigger host",
            )
        self.duration_ns = trace.duration_ns

    def node_local(self, topo: Topology) -> bool:
        """Whether each VM of the file stays on one NUMA node (one pass over the file)."""
        return node_local(self.trace(topo, 0), topo)

    def trace(self, topo: Topology, seed: int, nodes: Sequence[int] | None = None, reference: bool = False) -> Trace:
        """The file's trace; `seed` and `reference` mean nothing here, `nodes` is refused."""
        if nodes is not None:
            raise ValueError("workload trace replays its file whole: it cannot generate by node")
        try:
            return load(self.path)
        except (FileNotFoundError, IsADirectoryError):
            raise ConfigError("workload.path", f"no such file: {self.path}") from None
        except TraceError as e:
            raise ConfigError("workload.path", f"{self.path}: {e}") from None
