"""The only MLflow importer. Only the driver logs; actors return numbers.

One experiment per sweep (or as named), one run per job; a sweep's jobs are the children of
one parent run (SWEEP_TAG), which holds the sweep's overrides and its comparison table and plot.
A run is created just before the simulation starts and always ends FINISHED, FAILED (with the
reason in the `error` tag) or KILLED: never left RUNNING.
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
SWEEP_TAG = "hvbench.sweep_parent"  # set on a sweep's parent run; its jobs carry mlflow.parentRunId
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by


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
        self.failure: str | None = None  # set: the run ends FAILED with this reason, without an exception

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
    def start_run(self, experiment: str, run_name: str, tags: dict[str, object], parent_run_id: str | None = None) -> Iterator[JobRun]:
        """A job's run (a child of `parent_run_id` if given), or a sweep's parent run."""
        if parent_run_id is not None:
            tags = {**tags, PARENT_TAG: parent_run_id}
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
        if job.failure is not None:
            self._end(client, job.run_id, "FAILED", job.failure[:5000])
        else:
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


def load_runs(tracking_uri: str | None, which: str | None) -> tuple[str, list[dict]]:
    """(title, rows): the finished job runs of an experiment (the most recently created one if
    None) or of one sweep (`which` is its parent run's id), as flat dicts with the tags
    strategy/host/workload/seed, every metric, `run_id` and `params` (the job's config)."""
    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise LookupError(f"no MLflow store at {uri.removeprefix('sqlite:///')} (run hvbench here first, or pass --tracking-uri)")
    client = MlflowClient(tracking_uri=uri)
    parent = _parent_run(client, which)
    if parent is not None:
        exp_ids, title = [parent.info.experiment_id], f"sweep {parent.info.run_name} ({parent.info.run_id})"
        query = f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and attributes.status = 'FINISHED'"
    else:
        exp = _experiment(client, which)
        exp_ids, title, query = [exp.experiment_id], f"experiment {exp.name}", "attributes.status = 'FINISHED'"
    rows = []
    for run in client.search_runs(exp_ids, filter_string=query, max_results=5000):
        if run.data.tags.get(SWEEP_TAG):
            continue  # a sweep's parent: its children are the rows
        row = {k: run.data.tags.get(k, "?") for k in ("strategy", "host", "workload", "seed")}
        row.update(run.data.metrics)
        row["run_id"], row["params"] = run.info.run_id, run.data.params
        rows.append(row)
    return title, rows


def latest_sweep(tracking_uri: str | None, experiment: str) -> str:
    """The run id of the experiment's newest sweep parent run."""
    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    exp = _experiment(client, experiment)
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'true'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        raise LookupError(f"experiment {experiment!r} has no sweep (run it with hvbench -m)")
    return runs[0].info.run_id


def _parent_run(client: MlflowClient, which: str | None):
    """The sweep parent run whose id is `which`, or None if `which` is not a run id."""
    if which is None or len(which) != 32 or any(c not in "0123456789abcdef" for c in which):
        return None
    try:
        run = client.get_run(which)
    except Exception:  # noqa: BLE001 - MlflowException(RESOURCE_DOES_NOT_EXIST): an experiment name then
        return None
    if not run.data.tags.get(SWEEP_TAG):
        raise LookupError(f"run {which} is not a sweep's parent run (hvbench -m creates one per sweep)")
    return run


def _experiment(client: MlflowClient, name: str | None):
    if name is None:
        exps = [e for e in client.search_experiments(order_by=["creation_time DESC"]) if e.name != "Default"]
        if not exps:
            raise LookupError("no experiments in this tracking store")
        return exps[0]
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = [e.name for e in client.search_experiments() if e.name != "Default"]
        raise LookupError(f"no experiment {name!r}; allowed: {', '.join(names) or '(none)'}")
    return exp
