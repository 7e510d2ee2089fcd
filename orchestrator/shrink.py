"""`hvbench-shrink`: the shortest trace that shows a strategy letting a guest use a stale
translation, with a walk-through of its events and the strategies that stay clean on it.

    hvbench-shrink strategy=per_root_cpumask workload=overcommit [host=... seed=...]
    hvbench-shrink my-trace.jsonl strategy=per_root_cpumask host=x64
    hvbench-shrink ... -o FILE          (default: ./counterexample.jsonl, walk-through beside it)

The job is composed exactly as `hvbench` composes it (same overrides, same checks: a bad one is
one line and exit code 2). Its trace is regenerated up to the first stale use and shrunk by
hvmodel.shrink with the job's engine. Exit code 0 with a counter-example, 1 if the job shows no
stale use. Every hvbench job that finds stale uses logs its counter-example the same way
(`shrink_s`, orchestrator.main).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from hvmodel.errors import ConfigError
from hvmodel.trace import TraceError
from orchestrator import counterexample
from orchestrator.cli import UsageError, validate
from orchestrator.report import COUNTEREXAMPLE
from orchestrator.scenario import CONF_DIR, build_scenario

EXIT_NOT_FOUND = 1
EXIT_USAGE = 2


def compose_job(overrides: list[str]):
    """The hvbench job these overrides make (cli.validate's checks first)."""
    validate(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hvbench-shrink", description="A minimal counter-example for a strategy's stale translation uses.")
    p.add_argument("job", nargs="*", help="hvbench overrides (strategy=... workload=... host=... seed=...), optionally after a trace FILE")
    p.add_argument("-o", "--output", default=COUNTEREXAMPLE, help=f"the shrunk trace (default: ./{COUNTEREXAMPLE})")
    p.add_argument("--budget", type=float, default=120.0, help="seconds of search at most (default: 120)")
    args = p.parse_args(argv)
    job = list(args.job)
    if job and "=" not in job[0]:
        job = ["workload=trace", f"workload.path={Path(job[0]).resolve()}", *job[1:]]
    try:
        cfg = compose_job(job)
        scenario = build_scenario(cfg)
        name = _strategy_choice(job)
        result = scenario.engine(scenario.topo, copy.deepcopy(scenario.strategy)).run(scenario.make_trace())
    except (UsageError, ConfigError, TraceError) as e:
        print(f"hvbench-shrink: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not result["examples"]:
        print(f"hvbench-shrink: {scenario.strategy.name} shows no stale translation use on this job; nothing to shrink")
        return EXIT_NOT_FOUND
    found = counterexample.find(scenario, result["examples"][0], args.budget, result["vm"]["events"])
    if found is None:  # cannot happen: the prefix holds the stale use it was cut at
        print("hvbench-shrink: the stale use did not reproduce on the trace prefix", file=sys.stderr)
        return EXIT_NOT_FOUND
    ce, text = found
    notes = counterexample.write(ce, text, Path(args.output), name)
    print(text, end="")
    print(f"\ncounter-example: {args.output} ({len(ce.events)} events), walk-through: {notes}")
    return 0


def _strategy_choice(job: list[str]) -> str:
    """The strategy's config name, as hvbench tags the run (the default is upstream)."""
    return next((o.split("=", 1)[1] for o in job if o.startswith("strategy=")), "upstream")


if __name__ == "__main__":
    sys.exit(main())
