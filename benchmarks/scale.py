"""Scale runs: wall time, events, events/s and peak memory of `hvbench` sweeps per host size.

Runs the real console script (local Ray, SQLite MLflow) in a scratch directory, samples the
proportional set size (PSS) of the whole process tree (driver, Ray daemons, shard actors)
every 0.5 s, and reads the jobs' summary.json files. Prints a Markdown table.

    .venv/bin/python -m benchmarks.scale                      # the hosts of docs/performance.md
    .venv/bin/python -m benchmarks.scale --hosts x8192 --duration 60 --shards 1 --strategies all
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HVBENCH = str(Path(sys.executable).parent / "hvbench")


def tree(pid: int) -> list[int]:
    """pid and all its descendants (Ray's daemons and workers descend from the driver)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def pss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run(args: list[str], cwd: Path) -> tuple[float, int, subprocess.CompletedProcess]:
    """(wall seconds, peak PSS bytes, completed process)."""
    peak = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen([HVBENCH, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.wait(0.5):
            peak = max(peak, pss_bytes(tree(proc.pid)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    return time.perf_counter() - t0, peak, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", default="x64,x384,x1920,x8192")
    p.add_argument("--workload", default="partitioned_pinned_light")
    p.add_argument("--strategies", default="upstream,active_roots", help="comma list, or 'all' (every bare-metal strategy)")
    p.add_argument("--duration", type=float, default=10.0, help="simulated seconds")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--extra", default="", help="more overrides, space separated")
    a = p.parse_args()
    rows = []
    for host in a.hosts.split(","):
        with tempfile.TemporaryDirectory(prefix="hvbench-scale-") as tmp:
            strategies = "glob(*,exclude=[hyperv_flush_hypercall,*_elide])" if a.strategies == "all" else a.strategies
            args = ["-m", f"host={host}", f"workload={a.workload}", f"strategy={strategies}", f"workload.duration_s={a.duration}",
                    f"shards={a.shards}", "hydra.sweep.dir=sweep", *a.extra.split()]  # fmt: skip
            wall, peak, out = run(args, Path(tmp))
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                return out.returncode
            for summary in sorted(Path(tmp, "sweep").glob("*/summary.json"), key=lambda p: int(p.parent.name)):
                overrides = (summary.parent / ".hydra" / "overrides.yaml").read_text().split()
                strategy = next(o.split("=", 1)[1] for o in overrides if o.startswith("strategy="))
                rows.append((host, strategy, json.loads(summary.read_text())))
            print(f"{host}: sweep wall {wall:.1f} s, peak PSS of the process tree {peak / 2**30:.2f} GiB", flush=True)
            rows.append((host, "sweep", {"wall": wall, "peak": peak}))
    print(
        "\n| host | strategy | events | sim s | replay s | replay events/s | generation s | stale uses | RT IPIs | INVEPT global |"
        "\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for host, job, s in rows:
        if job == "sweep":
            print(f"| {host} | whole sweep: {s['wall']:.1f} s wall, peak {s['peak'] / 2**30:.2f} GiB | | | | | | | | |")
        else:
            cells = (host, job, f"{s['events']:,}", f"{s['sim_seconds']:g}", f"{s['sim_wall_s']:.1f}", f"{s['events_per_s']:,.0f}",
                     f"{s['gen_wall_s']:.1f}", f"{s['stale_tlb_uses']:,}", f"{s['ipi_rt']:,}", f"{s['invept_global']:,}")  # fmt: skip
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
