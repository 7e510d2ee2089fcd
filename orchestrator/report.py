"""Reports: per-run artifacts (per-pCPU CSV, rtla-style noise table, heatmap) and the strategy
comparison across the runs of an MLflow experiment (`hvbench-report`)."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

from hvmodel.host import Topology
from hvmodel.metrics import HAZARDS

COUNTEREXAMPLE = "counterexample.jsonl"  # a run's shrunk stale use; its walk-through: .txt
CSV_COLUMNS = (
    "ipi_flush",
    "ipi_vmclear",
    "vmexits_from_ipi",
    "invept_single",
    "invept_global",
    "invvpid",
    "migrations",
    "vmcs_first_loads",
    "pcpu_changes",
    "stale_tlb_uses",
    "noise_us",
    "noise_max_single_us",
    "noise_max_window_us",
    "noise_events",
    "rt_budget_violations",
    "flush_overhead_us",
)


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name and rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_per_cpu_csv(result: dict, topo: Topology, path: Path) -> None:
    pc = result["per_cpu"]
    node, rt = topo.node_of(), topo.rt_mask()
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("cpu", "node", "rt", *CSV_COLUMNS))
        for cpu in range(topo.nr_cpus):
            w.writerow((cpu, int(node[cpu]), int(rt[cpu]), *(_fmt(pc[c][cpu]) for c in CSV_COLUMNS)))


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float | np.floating) else str(int(v))


def osnoise_top(result: dict, topo: Topology, duration_ns: int, period_us: int) -> str:
    """An `rtla osnoise top` table for the RT-isolated pCPUs (time is in us).

    Host-side view of each pCPU: IRQ counts the flush/VMCLEAR IPIs it received, HW counts those
    that hit a running guest (osnoise *inside* that guest reports them as HW noise); NMI,
    Softirq and Thread interference are not modelled (0).
    """
    pc = result["per_cpu"]
    runtime = duration_ns / 1000
    periods = max(1, -(-int(runtime) // period_us))
    d = int(duration_ns // 1e9)
    lines = [
        " " * 42 + "Operating System Noise",
        f"duration: {d // 86400:3d} {d % 86400 // 3600:02d}:{d % 3600 // 60:02d}:{d % 60:02d} | time is in us",
        f"{'CPU':>3} {'Period':<8} {'Runtime':>12} {'Noise':>12} {'% CPU Aval':>11} {'Max Noise':>11} {'Max Single':>11}"
        f" {'HW':>11} {'NMI':>11} {'IRQ':>11} {'Softirq':>11} {'Thread':>11}",
    ]
    for cpu in np.flatnonzero(topo.rt_mask()):
        noise = pc["noise_us"][cpu]
        irq = pc["ipi_flush"][cpu] + pc["ipi_vmclear"][cpu]
        aval = 100.0 * (1 - noise / runtime) if runtime else 100.0
        lines.append(
            f"{cpu:>3} #{periods:<7} {runtime:>12.0f} {noise:>12.1f} {aval:>11.5f} {pc['noise_max_window_us'][cpu]:>11.1f}"
            f" {pc['noise_max_single_us'][cpu]:>11.1f} {pc['vmexits_from_ipi'][cpu]:>11} {0:>11} {irq:>11} {0:>11} {0:>11}"
        )
    return "\n".join(lines) + "\n"


def heatmap(result: dict, topo: Topology, path: Path, title: str = "") -> None:
    """IPIs received and noise per pCPU, one row per NUMA node (CPUs in node order). Drawn on a
    Figure of its own, not pyplot's global one: jobs of a sweep draw at the same time."""
    from matplotlib.figure import Figure

    pc = result["per_cpu"]
    node = topo.node_of()
    rows = [np.flatnonzero(node == n) for n in range(topo.numa_nodes)]
    width = max(len(r) for r in rows)
    fig = Figure(figsize=(min(16, 4 + width / 16), 2 + topo.numa_nodes * 0.25))
    axes = fig.subplots(2, 1, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], (("ipi", "IPIs received"), ("noise_us", "noise (us)"))):
        grid = np.full((topo.numa_nodes, width), np.nan)
        values = pc["ipi_flush"] + pc["ipi_vmclear"] if key == "ipi" else pc[key]
        for n, cpus in enumerate(rows):
            grid[n, : len(cpus)] = values[cpus]
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_ylabel("NUMA node")
        ax.set_xlabel("CPU index within node")
        ax.set_title(f"{title} {label}".strip(), fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def stale_verdict(summary: dict, examples: list[dict], strategy: str) -> str:
    """What a user must read first: is the strategy safe on this trace, and if not, why."""
    n = summary["stale_tlb_uses"]
    if not n:
        return f"SAFE on this trace: {strategy} let no guest use a stale translation."
    kinds = ", ".join(f"{k} {summary[f'stale_tlb_uses_{k}']}" for k in HAZARDS if summary[f"stale_tlb_uses_{k}"])
    out = [f"UNSAFE: {strategy} let guests use stale translations {n} times ({kinds})."]
    for e in examples[:3]:
        out.append(
            f"  t={e['t_ns']} ns vm {e['vm']} vcpu {e['vcpu']} pcpu {e['pcpu']}: {e['mmu']} root {e['root']}"
            f" ({e['hpa']}, epoch {e['epoch']}) but the pCPU caches root {e['cached_root']} of vm {e['cached_vm']}"
            f" at epoch {e['cached_epoch']}: {HAZARDS[e['kind']]}"
        )
    return "\n".join(out)


# --- comparing runs -------------------------------------------------------------------------
COMPARE_COLUMNS = (
    ("stale_tlb_uses", "stale uses", "{:.0f}"),
    ("ipi_rt_per_s", "RT IPIs/s", "{:.1f}"),
    ("rt_noise_max_us", "RT noise max us", "{:.1f}"),
    ("rt_budget_violations", "budget viol.", "{:.0f}"),
    ("invept_single_per_s", "INVEPT single/s", "{:.1f}"),
    ("invept_global_per_s", "INVEPT global/s", "{:.1f}"),
    ("ipi_flush_per_s", "flush IPIs/s", "{:.1f}"),
    ("cpumask_bytes_peak", "mask bytes", "{:.0f}"),
    ("flush_overhead_us", "overhead us", "{:.0f}"),
)


def compare_table(rows: list[dict], markdown: bool = False) -> str:
    """rows: dicts with 'strategy', 'host', 'workload' and metric keys. Safety first, then RT
    IPIs, INVEPT rates, mask memory, overhead. Aligned text, or a Markdown table (docs)."""
    rows = sorted(
        rows,
        key=lambda r: (
            r["host"],
            r["workload"],
            r.get("stale_tlb_uses", 0) > 0,
            r.get("ipi_rt_per_s", 0),
            r.get("flush_overhead_us", 0),
        ),
    )
    head = ["host", "workload", "strategy", "verdict", "counter-ex. events", *(c[1] for c in COMPARE_COLUMNS)]
    body = [
        [
            r["host"],
            r["workload"],
            r["strategy"],
            "UNSAFE" if r.get("stale_tlb_uses", 0) else "safe",
            f"{r['counterexample_events']:.0f}" if r.get("counterexample_events") else "-",
            *(f.format(r.get(k, float("nan"))) for k, _, f in COMPARE_COLUMNS),
        ]
        for r in rows
    ]
    return format_table(head, body, 5, markdown)


# The trace's own rates per vCPU (hvmodel.metrics.TRACE_RATE_KEYS), and what real KVM hosts show
# (../shared/reference/cost-anchors.md, "Workload rates seen on real KVM hosts").
RATE_COLUMNS = (  # key, label, unit, format, real hosts
    ("exits_per_vcpu_s", "exits", "/s", "{:.0f}", "1.7-3.5k"),
    ("halts_per_vcpu_s", "halts", "/s", "{:.0f}", "560-670 pinned RT"),
    ("preemptions_per_vcpu_s", "preempted", "/s", "{:.1f}", "8-20"),
    ("pcpu_changes_per_vcpu_s", "pCPU changes", "/s", "{:.1f}", "~39 unpinned, 0 pinned"),
    ("guest_mode_pct", "guest mode", " %", "{:.1f}", "~2 mostly halting"),
    ("steal_pct", "steal", " %", "{:.1f}", "0.2-6.5, worst VMs 8-33"),
)


def rates_table(rows: list[dict], markdown: bool = False) -> str:
    """How realistic each run's trace was: its rates per vCPU beside a real host's. Exits
    include those the strategy's IPIs caused; the rest is the same for every strategy."""
    rows = sorted(rows, key=lambda r: (r["host"], r["workload"], r["strategy"]))
    head = ["host", "workload", "strategy", *(label + unit for _, label, unit, _, _ in RATE_COLUMNS)]
    body = [[r["host"], r["workload"], r["strategy"], *(f.format(r.get(k, float("nan"))) for k, _, _, f, _ in RATE_COLUMNS)] for r in rows]
    body.append(["real hosts", "", "", *(c[4] for c in RATE_COLUMNS)])
    return format_table(head, body, 3, markdown)


def format_table(head: list, body: list[list], left: int, markdown: bool = False) -> str:
    """Aligned text (the first `left` columns to the left), or a Markdown table (docs)."""
    if markdown:
        line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"
        return "\n".join([line(head), line(["---"] * len(head)), *map(line, body)]) + "\n"
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i >= left else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]) + "\n"


def rates_line(summary: dict) -> str:
    """A job's trace rates on one line (printed after its run)."""
    cells = ", ".join(f"{label} {f.format(summary[k])}{unit}" for k, label, unit, f, _ in RATE_COLUMNS)
    return f"trace rates per vCPU: {cells} (hvbench-report compares them with real hosts)"


def write_sweep(rows: list[dict], out: Path, title: str) -> None:
    """A sweep's comparison (orchestrator.launcher logs it on the sweep's parent run): the
    tables as text and Markdown, and the plot."""
    out.mkdir(parents=True, exist_ok=True)
    for name, md in (("comparison.txt", False), ("comparison.md", True)):
        text = f"{title}: {len(rows)} finished jobs\n\n{compare_table(rows, md)}\nTrace rates per vCPU:\n\n{rates_table(rows, md)}"
        write_atomic(out / name, text)
    if rows:
        plot_comparison(rows, out / "comparison.png", title)


def main(argv: list[str] | None = None) -> int:
    from orchestrator.tracking import load_runs

    p = argparse.ArgumentParser(prog="hvbench-report", description="Compare the strategies of an MLflow experiment or sweep.")
    p.add_argument("experiment", nargs="?", help="experiment name, or a sweep's parent run id (default: the most recent experiment)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///$PWD/mlflow.db)")
    p.add_argument("--plot", default="comparison.png", help="where to write the comparison plot ('' for none)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (for docs)")
    args = p.parse_args(argv)
    try:
        name, rows = load_runs(args.tracking_uri, args.experiment)
    except LookupError as e:
        print(f"hvbench-report: error: {e}", file=sys.stderr)
        return 2
    print(f"{name}: {len(rows)} finished runs\n")
    print(compare_table(rows, args.markdown))
    print("How realistic the traces were (per vCPU):\n")
    print(rates_table(rows, args.markdown))
    for r in sorted(rows, key=lambda r: (r["host"], r["workload"], r["strategy"])):
        if r.get("counterexample_events"):
            where = f"runs:/{r['run_id']}/run/{COUNTEREXAMPLE}"
            n = r["counterexample_events"]
            print(f"counter-example, {r['strategy']} on {r['host']}/{r['workload']}: {n:.0f} events, {where} (+ .txt)")
    if args.plot:
        plot_comparison(rows, Path(args.plot), name)
        print(f"plot: {args.plot}")
    return 0


def plot_comparison(rows: list[dict], path: Path, title: str) -> None:
    """One panel per metric that matters, one bar per strategy (per host/workload), unsafe in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: (r["host"], r["workload"], r["strategy"]))
    labels = [f"{r['strategy']}\n{r['host']}/{r['workload']}" for r in rows]
    colors = ["tab:red" if r.get("stale_tlb_uses", 0) else "tab:green" for r in rows]
    panels = [
        ("stale_tlb_uses", "stale uses"),
        ("ipi_rt_per_s", "RT IPIs/s"),
        ("invept_global_per_s", "INVEPT global/s"),
        ("invept_single_per_s", "INVEPT single/s"),
        ("cpumask_bytes_peak", "mask bytes"),
        ("flush_overhead_us", "overhead us"),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.9 * len(rows)), 2.2 * len(panels)), sharex=True)
    for ax, (key, label) in zip(axes, panels):
        ax.bar(range(len(rows)), [r.get(key, 0) for r in rows], color=colors)
        ax.set_ylabel(label, fontsize=8)
    axes[-1].set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    axes[0].set_title(f"{title} (red: stale translation uses found)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
