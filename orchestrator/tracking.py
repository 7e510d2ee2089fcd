"""The only MLflow importer. Only the driver logs; actors return numbers.

One experiment per sweep (or as named), one run per job. A run is created just before the
simulation starts and always ends FINISHED, FAILED (with the reason in the `error` tag) or
KILLED: never left RUNNING.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

MAX_PARAM_LEN = 6000


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@contextmanager
def _db_lock(uri: str) -> Iterator[None]:
    """Serialise experiment creation on a local SQLite store (first use runs migrations, and
    concurrent first uses race)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# Jobs of a sweep run in threads of the driver: one MLflow call at a time (an embedded SQLite
# store takes one writer; the calls are few and short).
_MLFLOW = threading.Lock()


class JobRun:
    """Logging into one MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: dict[str, float]) -> None:
        ts = _now_ms()
        batch = [Metric(k, float(v), ts, 0) for k, v in metrics.items()]
        with _MLFLOW:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: dict[str, object]) -> None:
        batch = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        with _MLFLOW:
            self.client.log_batch(self.run_id, params=batch)

    def set_tags(self, tags: dict[str, object]) -> None:
        with _MLFLOW:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        with _MLFLOW:
            self.client.log_artifacts(self.run_id, str(path), artifact_path)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


class MlflowTracker:
    """tracking_uri: None means an SQLite file in the launch directory; or http(s)://server."""

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None):
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def experiment_id(self, client: MlflowClient, name: str) -> str:
        with _db_lock(self.tracking_uri):
            exp = client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            location = None
            if self.tracking_uri.startswith("sqlite:///"):  # keep artifacts beside the DB, not in cwd
                db = Path(self.tracking_uri.removeprefix("sqlite:///"))
                location = (db.parent / "mlartifacts" / name).as_uri()
            return client.create_experiment(name, artifact_location=location)

    def open(self, experiment: str) -> None:
        """Open the store (creating an SQLite database takes seconds) and the experiment now:
        the launcher does this while Ray starts. A failure here is left for the job to report."""
        try:
            with _MLFLOW:
                self.experiment_id(self.client(), self.experiment or experiment)
        except Exception:  # noqa: BLE001 - the job's start_run raises it again, with its run
            pass

    @contextmanager
    def start_run(self, experiment: str, run_name: str, tags: dict[str, object]) -> Iterator[JobRun]:
        client = self.client()
        with _MLFLOW:
            exp_id = self.experiment_id(client, self.experiment or experiment)
            tags = {**tags, "driver_pid": os.getpid()}  # the process that logs the run: always the driver
            run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        job = JobRun(client, run.info.run_id)
        try:
            yield job
        except KeyboardInterrupt:
            self._end(client, job.run_id, "KILLED", "interrupted")
            raise
        except BaseException as e:
            self._end(client, job.run_id, "FAILED", f"{type(e).__name__}: {e}"[:5000])
            raise
        self._end(client, job.run_id, "FINISHED")

    @staticmethod
    def _end(client: MlflowClient, run_id: str, status: str, error: str | None = None) -> None:
        with _MLFLOW:
            if error is not None:
                client.set_tag(run_id, "error", error)
            client.set_terminated(run_id, status)


def git_commit(repo: Path) -> str:
    """The commit of the code that ran (with '-dirty' if the tree had changes), or 'unknown'."""
    import subprocess

    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("HVBENCH_GIT_COMMIT", "unknown")


def load_runs(tracking_uri: str | None, experiment: str | None) -> tuple[str, list[dict]]:
    """Finished runs of an experiment (the most recently created one if None), as flat dicts
    with the tags strategy/host/workload/seed and every metric."""
    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise LookupError(f"no MLflow store at {uri.removeprefix('sqlite:///')} (run hvbench here first, or pass --tracking-uri)")
    client = MlflowClient(tracking_uri=uri)
    if experiment is None:
        exps = [e for e in client.search_experiments(order_by=["creation_time DESC"]) if e.name != "Default"]
        if not exps:
            raise LookupError("no experiments in this tracking store")
        exp = exps[0]
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = [e.name for e in client.search_experiments() if e.name != "Default"]
            raise LookupError(f"no experiment {experiment!r}; allowed: {', '.join(names) or '(none)'}")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=5000)
    rows = []
    for run in runs:
        row = {k: run.data.tags.get(k, "?") for k in ("strategy", "host", "workload", "seed")}
        row.update(run.data.metrics)
        row["run_id"] = run.info.run_id
        rows.append(row)
    return exp.name, rows
