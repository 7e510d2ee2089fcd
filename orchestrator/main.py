"""The Hydra app: cfg -> scenario -> sharded emulator on Ray -> summary.json + MLflow run."""

from __future__ import annotations

import contextvars
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hvmodel.engine import timing
from hvmodel.errors import ConfigError
from hvmodel.metrics import summarize
from hvmodel.trace import TraceError, save_binary
from orchestrator import counterexample, report
from orchestrator.scenario import CONF_DIR, GROUPS, REPO, Scenario, build_scenario
from orchestrator.sharding import Progress, run_shards, shard_plan
from orchestrator.tracking import git_commit


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def job_identity(cfg: DictConfig) -> tuple[str, str, dict]:
    """(experiment, run name, tags) for this job, from the Hydra runtime."""
    hc = HydraConfig.get()
    choices = hc.runtime.choices
    names = {g: choices.get(g, "?") for g in ("host", "workload", "strategy", "cost", "noise")}
    names["host"] += _qualifier(hc.overrides.task, "host")
    names["workload"] += _qualifier(hc.overrides.task, "workload")
    names["cost"] += _qualifier(hc.overrides.task, "cost")
    if hc.mode == RunMode.MULTIRUN:
        sweep = str(Path(hc.sweep.dir))
        experiment = "hvbench-" + "_".join(Path(hc.sweep.dir).parts[-2:])
        job = str(hc.job.num)
    else:
        sweep, experiment, job = "", "hvbench", "0"
    tags = {
        **names,
        "seed": cfg.seed,
        "sweep": sweep,
        "job_num": job,
        "overrides": " ".join(hc.overrides.task),
        "git_commit": git_commit(REPO),
        "output_dir": hc.runtime.output_dir,
    }
    run_name = f"{names['strategy']}|{names['host']}|{names['workload']}|seed{cfg.seed}"
    return experiment, run_name, tags


def _qualifier(overrides, group: str) -> str:
    """A preset with fields overridden is another host, workload or cost model: say which, as
    in x16[isolcpus=9] or overcommit[lifecycle.zap_per_s=8]. A group an experiment appends
    (+vm_shape=4x4, experiments/vm_shape/) qualifies the workload, whose fields it sets."""
    keys = [o.lstrip("~") for o in overrides]
    changed = [k.lstrip("+").removeprefix(f"{group}.") for k in keys if k.lstrip("+").startswith(f"{group}.")]
    if group == "workload":
        changed += [k[1:] for k in keys if k.startswith("+") and "." not in k.split("=")[0] and k[1:].split("=")[0] not in GROUPS]
    return f"[{','.join(changed)}]" if changed else ""


def run(cfg: DictConfig) -> dict:
    """One job. Bad input raises ConfigError before anything is written to MLflow."""
    return prepare(cfg)()


@dataclass
class Job:
    """One job, checked and built, with what it took from Hydra's job context (which is global:
    one job at a time); calling it runs the job, in any thread of this process."""

    scenario: Scenario
    cluster: object
    tracker: object
    shards: int
    out: Path
    experiment: str
    run_name: str
    tags: dict
    params: dict
    save: Path | None
    shrink_s: float  # seconds to shrink the first stale use into a counter-example (0: off)
    parent_run_id: str | None = None  # the sweep's parent run (orchestrator.launcher), if any

    @property
    def cpus(self) -> float:
        """Ray CPUs the job holds while it runs: one bundle per shard."""
        return len(shard_plan(self.scenario.topo.numa_nodes, self.shards)) * self.cluster.cpus_per_shard

    def __call__(self) -> dict:
        return execute(self)


def prepare(cfg: DictConfig) -> Job:
    scenario = build_scenario(cfg)
    out = Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    experiment, run_name, tags = job_identity(cfg)
    return Job(
        scenario=scenario,
        cluster=instantiate(cfg.cluster),
        tracker=instantiate(cfg.tracking),
        shards=cfg.shards,
        out=out,
        experiment=experiment,
        run_name=run_name,
        tags=tags,
        params=flatten(OmegaConf.to_container(cfg, resolve=True)),
        save=Path(cfg.trace.save) if cfg.trace.save else None,
        shrink_s=float(cfg.shrink_s),
    )


def execute(j: Job) -> dict:
    """Run a prepared job: its shards on Ray, its MLflow run and artifacts from this process."""
    scenario, out, run_name = j.scenario, j.out, j.run_name
    if j.save is not None:
        n = save_binary(scenario.make_trace(), j.save)
        print(f"[hvbench] trace: {n:,} events written to {j.save}", file=sys.stderr)
    with j.tracker.start_run(j.experiment, run_name, j.tags, j.parent_run_id) as job:
        job.log_params(j.params)
        t0 = time.perf_counter()
        progress = Progress(min(j.shards, scenario.topo.numa_nodes), scenario.workload.duration_ns, label=run_name)
        result = run_shards(scenario, j.cluster, j.shards, progress)
        wall = time.perf_counter() - t0
        summary = summarize(result, scenario.topo.rt_mask(), result["duration_ns"] / 1e9)
        # the slowest shard's replay, and its trace generation, apart; job_wall_s has Ray start-up too
        slowest = max(result["shards"], key=lambda s: s["replay_s"] + s["gen_s"])
        summary.update(timing(summary["events"], slowest["replay_s"], slowest["gen_s"]))
        summary["job_wall_s"] = wall
        summary["shards"] = len(result["shards"])
        if summary["stale_tlb_uses"] and j.shrink_s > 0:
            summary["counterexample_events"] = log_counterexample(j, result, summary["events"])
        write_artifacts(out, summary, result, scenario, run_name)
        job.set_tags({"ray_nodes": ",".join(str(s["node_id"]) for s in result["shards"]), "engine": result["engine"]})
        job.log_metrics(summary)
        job.log_artifacts(out, "run")
    print(report.stale_verdict(summary, result["examples"], scenario.strategy.name))
    print(
        f"[hvbench] {run_name}: {summary['events']:,} events in {wall:.1f} s; INVEPT single/global "
        f"{summary['invept_single']}/{summary['invept_global']}, flush IPIs {summary['ipi_flush']}, "
        f"RT IPIs {summary['ipi_rt']}; {out}/summary.json"
    )
    print(f"[hvbench] {run_name}: {report.rates_line(summary)}")
    return summary


def log_counterexample(j: Job, result: dict, events: int) -> int:
    """The first stale use, shrunk (orchestrator.counterexample) into the run's artifacts;
    returns its length in events (0 if none was found in the time budget)."""
    t0 = time.perf_counter()
    found = counterexample.find(j.scenario, result["examples"][0], j.shrink_s, events)
    if found is None:
        return 0
    ce, text = found
    path = j.out / report.COUNTEREXAMPLE
    counterexample.write(ce, text, path, j.tags["strategy"])
    print(f"[hvbench] {j.run_name}: a {len(ce.events)}-event counter-example in {time.perf_counter() - t0:.1f} s: {path}", file=sys.stderr)
    return len(ce.events)


def write_artifacts(out: Path, summary: dict, result: dict, scenario, title: str) -> None:
    topo = scenario.topo
    report.write_atomic(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    report.write_atomic(out / "stale_examples.json", json.dumps(result["examples"], indent=2) + "\n")
    report.write_atomic(
        out / "osnoise_top.txt", report.osnoise_top(result, topo, int(summary["sim_seconds"] * 1e9), scenario.noise.period_us)
    )
    report.write_per_cpu_csv(result, topo, out / "per_cpu.csv")
    report.heatmap(result, topo, out / "heatmap.png", title)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig):
    """A single run runs here; under the concurrent launcher (orchestrator.launcher) the job is
    only prepared here and runs later, in a thread of this process."""
    try:
        if DEFER.get():
            return prepare(cfg)
        return run(cfg)["stale_tlb_uses"]
    except (ConfigError, TraceError) as e:  # bad input: one line, exit 2 (the run, if any, is FAILED)
        print(f"hvbench: error: {e}", file=sys.stderr)
        sys.exit(2)


DEFER: contextvars.ContextVar[bool] = contextvars.ContextVar("hvbench_defer", default=False)
