"""Trace generator speed: the compiled generator alone (no emulator), chunk by chunk, and the
Python reference on a short prefix of the same trace (checked byte-identical). Prints a Markdown
table. Workload and host are the YAML presets of conf/, with their defaults.

    .venv/bin/python -m benchmarks.gen_speed                       # the three cases below, 10 s
    .venv/bin/python -m benchmarks.gen_speed --duration 60 --cases partitioned_pinned:x8192
    .venv/bin/python -m benchmarks.gen_speed --startup             # also cold compile / warm start-up

The machine is shared: run it while nothing else is busy, and compare rates within one run;
events/CPU-s (process time) is the per-core rate, less sensitive to other load than wall time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"
CASES = "overcommit:x384,rt_mixed:x1920,partitioned_pinned_light:x8192"

# Imports and generates a short trace of every workload: the compiled code is loaded from the
# cache, or compiled (and written to it) when the cache is empty.
STARTUP = """
import time
t0 = time.perf_counter()
from hvmodel.host import Topology
from hvmodel.workloads.overcommit import Overcommit
from hvmodel.workloads.partitioned_pinned import PartitionedPinned
from hvmodel.workloads.rt_mixed import RtMixed
topo = Topology(nr_cpus=16, name="x16")
for w in (PartitionedPinned(duration_s=0.05), Overcommit(duration_s=0.05, nested_fraction=1.0), RtMixed(duration_s=0.05)):
    w.trace(topo, 0).to_array()
print(time.perf_counter() - t0)
"""


def build(workload: str, host: str, duration_s: float):
    """The conf/ presets, as `hvbench workload=... host=...` builds them."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    topo = instantiate(OmegaConf.load(CONF / "host" / f"{host}.yaml"))
    cfg = OmegaConf.load(CONF / "workload" / f"{workload}.yaml")
    cfg.duration_s = duration_s
    return instantiate(cfg), topo


def generate(workload, topo, seed: int, reference: bool = False, digest: bool = False) -> tuple[int, float, str]:
    """(events, wall seconds, sha256 of the trace's bytes if asked) of one pass over the trace."""
    n, h = 0, hashlib.sha256()
    t0 = time.perf_counter()
    for chunk in workload.trace(topo, seed, reference=reference):
        n += len(chunk)
        if digest:
            h.update(chunk.tobytes())
    return n, time.perf_counter() - t0, h.hexdigest()


def one_case(case: str, duration_s: float, prefix_s: float, seed: int) -> dict:
    """Measure one workload:host; run in a process of its own, so its peak RSS is its own."""
    name, host = case.split(":")
    generate(*build(name, host, 0.01), seed)  # load (or compile) the compiled code first
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu0 = time.process_time()
    n, wall, _ = generate(*build(name, host, duration_s), seed)
    cpu = time.process_time() - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    w, topo = build(name, host, prefix_s)
    pn, fast_s, fast_digest = generate(w, topo, seed, digest=True)
    rn, ref_s, ref_digest = generate(w, topo, seed, reference=True, digest=True)
    assert (rn, ref_digest) == (pn, fast_digest), f"{case}: the compiled trace differs from the reference"
    return {
        "case": case,
        "events": n,
        "wall": wall,
        "cpu": cpu,
        "rss": rss,
        "base_rss": base_rss,
        "prefix": pn,
        "fast_s": fast_s,
        "ref_s": ref_s,
    }


def startup_times() -> tuple[float, float]:
    """(cold, warm) seconds to import the generators and run each once, in fresh processes
    sharing an empty compile cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "HVBENCH_CACHE_DIR": cache}
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", STARTUP], env=env, check=True, capture_output=True)
            runs.append(time.perf_counter() - t0)
    return runs[0], runs[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=CASES, help=f"workload:host,... (default {CASES})")
    ap.add_argument("--duration", type=float, default=10.0, help="simulated seconds per case (default 10)")
    ap.add_argument("--prefix", type=float, default=0.5, help="simulated seconds for fast vs reference (default 0.5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup", action="store_true", help="also measure cold compile and warm start-up")
    ap.add_argument("--one", metavar="WORKLOAD:HOST", help=argparse.SUPPRESS)  # one case, as JSON (internal)
    args = ap.parse_args()

    if args.one:
        print(json.dumps(one_case(args.one, args.duration, args.prefix, args.seed)))
        return
    columns = "workload,host,sim s,events,wall s,events/s,events/CPU-s,peak RSS MiB (before),prefix events,ref. events/s,speed-up"
    print("| " + " | ".join(columns.split(",")) + " |")
    print("|---" * len(columns.split(",")) + "|")
    for case in args.cases.split(","):
        cmd = [sys.executable, "-m", "benchmarks.gen_speed", "--one", case, "--duration", str(args.duration), "--prefix", str(args.prefix)]
        out = subprocess.run([*cmd, "--seed", str(args.seed)], check=True, capture_output=True, text=True, cwd=CONF.parent)
        r = json.loads(out.stdout.splitlines()[-1])
        name, host = case.split(":")
        rate, ref_rate = r["events"] / r["wall"], r["prefix"] / r["ref_s"]
        print(
            f"| {name} | {host} | {args.duration:g} | {r['events']:,} | {r['wall']:.2f} | {rate:,.0f} | {r['events'] / r['cpu']:,.0f}"
            f" | {r['rss']:.0f} ({r['base_rss']:.0f}) | {r['prefix']:,} | {ref_rate:,.0f} | {r['ref_s'] / r['fast_s']:.0f}x |",
            flush=True,
        )
    if args.startup:
        cold, warm = startup_times()
        print(f"\nstart-up (import + one short trace of each workload): cold cache {cold:.1f} s, warm cache {warm:.1f} s")


if __name__ == "__main__":
    main()
