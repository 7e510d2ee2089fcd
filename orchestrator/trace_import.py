"""`hvbench-import`: a real host trace (`trace-cmd report` text, or `perf script` text of the same
tracepoints) as a binary hvbench trace (docs/trace-format.md, "Importing real traces").

    hvbench-import host.txt -o host.hvt                 # host size: cpus= header, else highest CPU + 1
    hvbench-import host.txt -o host.hvt host=x16        # or --host x16 (a conf/host preset), or --cpus 48
    hvbench-import perf.txt -o host.hvt --format perf   # default: auto

It prints what it mapped (processes -> VMs, threads -> vCPUs), what it skipped and why, what it
fixed up to keep every replay precondition (hvmodel/trace_import.py), and the hvbench command that
replays the trace. A file it cannot read is one line, `hvbench-import: error: ...`, exit code 2,
and nothing is written.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from hvmodel.trace import save_binary
from hvmodel.trace_import import FORMATS, TraceImportError, import_trace

EXIT_USAGE = 2
HOST_PRESETS = Path(__file__).resolve().parent.parent / "conf" / "host"


def preset_cpus(name: str) -> int:
    """nr_cpus of a conf/host preset, read as plain YAML (no Hydra composition needed)."""
    from omegaconf import OmegaConf  # only when a preset is asked for: the import itself needs none

    path = HOST_PRESETS / f"{name}.yaml"
    if not path.is_file():
        allowed = ", ".join(sorted(p.stem for p in HOST_PRESETS.glob("*.yaml")))
        raise TraceImportError(f"host: unknown preset {name!r}; allowed: {allowed}")
    n = OmegaConf.load(path).get("nr_cpus")
    if not isinstance(n, int):
        raise TraceImportError(f"host: {path} has no integer nr_cpus")
    return n


def host_choice(args: argparse.Namespace) -> tuple[str, int | None]:
    """(preset name or "", CPU count or None) from host=NAME, --host NAME or --cpus N."""
    host = args.host or ""
    for extra in args.overrides:
        key, sep, value = extra.partition("=")
        if key != "host" or not sep or not value:
            raise TraceImportError(f"unexpected argument {extra!r}: only host=NAME may follow the input file")
        if host and host != value:
            raise TraceImportError(f"two hosts given: {host} and {value}")
        host = value
    if host and args.cpus is not None:
        raise TraceImportError("give either a host preset or --cpus, not both")
    return host, (preset_cpus(host) if host else args.cpus)


def replay_command(out: Path, host: str, nr_cpus: int) -> str:
    """hvbench sizes a trace's host from the host group (TraceFile.check refuses a pCPU it lacks):
    the preset, or x16 resized; no SMT, since the trace does not say which CPUs are siblings."""
    size = f"host={host}" if host else f"host.nr_cpus={nr_cpus} host.smt=1"
    return f"hvbench workload=trace workload.path={shlex.quote(str(out))} {size}"


def write(trace, out: Path) -> int:
    """save_binary writes OUT.part and renames it; a failed write leaves neither behind."""
    try:
        return save_binary(trace, out)
    except OSError as e:
        out.with_name(out.name + ".part").unlink(missing_ok=True)
        raise TraceImportError(f"cannot write {out}: {e.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="hvbench-import", description="Convert trace-cmd report / perf script text into a binary hvbench trace."
    )
    p.add_argument("input", help="the text of `trace-cmd report` or `perf script`")
    p.add_argument("overrides", nargs="*", metavar="host=NAME", help="size the host as a conf/host preset (same as --host)")
    p.add_argument("-o", "--output", help="the binary trace to write (default: INPUT's name with .hvt, in the current directory)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="the input's layout (default: auto)")
    p.add_argument("--host", help="a conf/host preset whose nr_cpus is the host size (e.g. x16)")
    p.add_argument("--cpus", type=int, help="the host's CPU count (default: the cpus= header, else the highest CPU seen + 1)")
    a = p.parse_intermixed_args(argv)  # host=NAME may come after -o
    out = Path(a.output) if a.output else Path(Path(a.input).stem + ".hvt")
    try:
        host, nr_cpus = host_choice(a)
        trace, report = import_trace(a.input, a.format, nr_cpus, host)
        n = write(trace, out)
    except TraceImportError as e:
        print(f"hvbench-import: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(report.render())
    print(f"wrote {out}: {n} events, {trace.duration_ns} ns")
    print(f"replay: {replay_command(out, host, report.nr_cpus)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
