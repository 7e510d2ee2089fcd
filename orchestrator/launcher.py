"""The Hydra launcher of `hvbench -m`: the jobs of a sweep run at the same time, as many as the
Ray cluster's CPUs hold, each job's MLflow run logged from this (the driver) process.

hydra-ray-launcher 1.2.2 installs beside Ray 2.60 and runs jobs concurrently, but it runs each
job's task function in a Ray worker (so a job would log to MLflow from there) and hands results
back only when the whole sweep is done; a job here is a thread of the driver that drives its
shard actors (docs/performance.md). Hydra's per-job setup (HydraConfig, output directory,
.hydra/) is global state, so it is done one job at a time in the main thread, by Hydra's own
run_job; the job then runs in a thread of its own.

The sweep is one MLflow parent run (its overrides; its comparison table and plot as artifacts,
from the jobs' summaries once they are done) and each job's run is its child: the MLflow UI
shows the sweep as one row that expands, and `hvbench-report RUN_ID` compares its jobs.

Ctrl-C stops every running job (their runs end KILLED, and the parent with them), never starts
the queued ones, and stops the local Ray instance, so no Ray process is left behind.
"""

from __future__ import annotations

import logging
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from hvmodel.errors import ConfigError
from hvmodel.trace import TraceError
from orchestrator import main, report, sharding
from orchestrator.sharding import LocalRay
from orchestrator.tracking import SWEEP_TAG

log = logging.getLogger(__name__)


class HvbenchLauncher(Launcher):
    """Runs a sweep's jobs at the same time in threads of this process (see the module)."""

    def __init__(self, max_parallel: int | None = None) -> None:
        self.max_parallel = max_parallel
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        returns = [self._prepare(initial_job_idx + k, overrides) for k, overrides in enumerate(job_overrides)]
        jobs = [r.return_value for r in returns if r.status == JobStatus.COMPLETED]
        # the tracking store opens while Ray starts (ray.init must run in the main thread)
        tracking = threading.Thread(target=jobs[0].tracker.open, args=(jobs[0].experiment,), daemon=True) if jobs else None
        if tracking is not None:
            tracking.start()
        cluster = instantiate(self.config.cluster)
        cluster.ensure()
        if tracking is not None:
            tracking.join()
        cpus = _cluster_cpus()
        log.info(
            f"Launching {len(returns)} jobs on {cpus:g} Ray CPUs"
            + (f", at most {self.max_parallel} at a time" if self.max_parallel else "")
        )
        sharding.JOBS_IN_PARALLEL.set()
        try:
            if jobs:
                self._run_sweep(returns, jobs, cpus)
        except KeyboardInterrupt:
            print("[hvbench] interrupted: running jobs are KILLED, queued ones never start", file=sys.stderr)
            if isinstance(cluster, LocalRay):
                import ray

                ray.shutdown()
            raise
        finally:
            sharding.JOBS_IN_PARALLEL.clear()
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        if any(r.status == JobStatus.FAILED and isinstance(r._return_value, UsageError) for r in returns):
            sys.exit(2)  # each said in one line already
        return returns

    def _prepare(self, idx: int, overrides) -> JobReturn:
        """Hydra's job setup, one job at a time; the task function only prepares the job."""
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        token = main.DEFER.set(True)
        try:
            return run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        finally:
            main.DEFER.reset(token)

    def _run_sweep(self, returns: list[JobReturn], jobs: list, cpus: float) -> None:
        """The jobs under their sweep's parent run, which ends FAILED if one of them failed."""
        hc, first = self.config.hydra, jobs[0]
        sweep_dir = Path(str(hc.sweep.dir))
        params = {f"sweep.{k.lstrip('+~')}": v for k, v in (hc.sweeper.params or {}).items()}  # MLflow keys: no + or ~
        params.update(config_name=hc.job.config_name, overrides=" ".join(hc.overrides.task), jobs=len(returns))
        tags = {SWEEP_TAG: "true", "sweep": str(sweep_dir), "git_commit": first.tags["git_commit"]}
        name = f"{hc.job.config_name} sweep {'_'.join(sweep_dir.parts[-2:])}"
        with first.tracker.start_run(first.experiment, name, tags) as parent:
            parent.log_params(params)
            for job in jobs:
                job.parent_run_id = parent.run_id
            rows = self._run_all(returns, cpus)
            out = sweep_dir / "sweep"
            report.write_sweep(rows, out, name)
            parent.log_artifacts(out, "sweep")
            parent.log_metrics({"jobs_finished": len(rows), "jobs_unsafe": sum(1 for r in rows if r["stale_tlb_uses"])})
            failed = [str(k) for k, r in enumerate(returns) if r.status == JobStatus.FAILED]
            if failed:
                parent.failure = f"jobs {', '.join(failed)} failed"

    def _run_all(self, returns: list[JobReturn], cpus: float) -> list[dict]:
        """Start jobs, in order, while the ones running leave CPUs for them (each holds its
        shards' CPUs); a job too big for the cluster starts alone and says so. Returns the
        finished jobs' report rows (their names and summaries)."""
        queue = [r for r in returns if r.status == JobStatus.COMPLETED]
        rows = []
        parallel = int(self.max_parallel or max(1, cpus))
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="hvbench-job") as pool:
            running: dict[Future, JobReturn] = {}
            try:
                while queue or running:
                    while queue and len(running) < parallel and (not running or _held(running) + queue[0].return_value.cpus <= cpus):
                        ret = queue.pop(0)
                        running[pool.submit(ret.return_value)] = ret
                    finished, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in finished:
                        rows += _settle(running.pop(future), future)
            except KeyboardInterrupt:
                sharding.CANCEL.set()  # every job's driver loop raises KeyboardInterrupt: runs KILLED
                wait(list(running))
                raise
            finally:
                sharding.CANCEL.clear()
        return rows


class UsageError(Exception):
    """A job failed on bad input (already reported in one line)."""


def _settle(ret: JobReturn, future: Future) -> list[dict]:
    """The job's outcome into its JobReturn; its report row if it finished."""
    job = ret.return_value
    try:
        summary = future.result()
    except (ConfigError, TraceError) as e:
        print(f"hvbench: error: {e}", file=sys.stderr)
        ret.status, ret.return_value = JobStatus.FAILED, UsageError(str(e))
        return []
    except Exception as e:
        ret.status, ret.return_value = JobStatus.FAILED, e
        return []
    ret.return_value = summary["stale_tlb_uses"]
    return [{k: job.tags[k] for k in ("strategy", "host", "workload", "seed")} | summary]


def _held(running: dict[Future, JobReturn]) -> float:
    return sum(r.return_value.cpus for r in running.values())


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))
