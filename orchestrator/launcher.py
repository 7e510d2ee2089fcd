"""The Hydra launcher of `hvbench -m`: the jobs of a sweep run at the same time, as many as the
Ray cluster's CPUs hold, each job's MLflow run logged from this (the driver) process.

hydra-ray-launcher 1.2.2 installs beside Ray 2.60 and runs jobs concurrently, but it runs each
job's task function in a Ray worker (so a job would log to MLflow from there) and hands results
back only when the whole sweep is done; a job here is a thread of the driver that drives its
shard actors (docs/performance.md). Hydra's per-job setup (HydraConfig, output directory,
.hydra/) is global state, so it is done one job at a time in the main thread, by Hydra's own
run_job; the job then runs in a thread of its own.

Ctrl-C stops every running job (their runs end KILLED), never starts the queued ones, and stops
the local Ray instance, so no Ray process is left behind.
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
from orchestrator import main, sharding
from orchestrator.sharding import LocalRay

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
            self._run_all(returns, cpus)
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

    def _run_all(self, returns: list[JobReturn], cpus: float) -> None:
        """Start jobs, in order, while the ones running leave CPUs for them (each holds its
        shards' CPUs); a job too big for the cluster starts alone and says so."""
        queue = [r for r in returns if r.status == JobStatus.COMPLETED]
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
                        _settle(running.pop(future), future)
            except KeyboardInterrupt:
                sharding.CANCEL.set()  # every job's driver loop raises KeyboardInterrupt: runs KILLED
                wait(list(running))
                raise
            finally:
                sharding.CANCEL.clear()


class UsageError(Exception):
    """A job failed on bad input (already reported in one line)."""


def _settle(ret: JobReturn, future: Future) -> None:
    try:
        ret.return_value = future.result()["stale_tlb_uses"]
    except (ConfigError, TraceError) as e:
        print(f"hvbench: error: {e}", file=sys.stderr)
        ret.status, ret.return_value = JobStatus.FAILED, UsageError(str(e))
    except Exception as e:
        ret.status, ret.return_value = JobStatus.FAILED, e


def _held(running: dict[Future, JobReturn]) -> float:
    return sum(r.return_value.cpus for r in running.values())


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))
