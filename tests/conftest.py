"""Shared fixtures: one small Ray instance for the whole session, Hydra configs composed with
the Compose API (as `hvbench` would compose them), an MLflow SQLite store per test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF = str(REPO / "conf")
HVBENCH = str(Path(sys.executable).parent / "hvbench")
REPORT = str(Path(sys.executable).parent / "hvbench-report")

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


def compose_cfg(overrides: list[str], output_dir: Path):
    """A job config exactly as Hydra builds it, with HydraConfig set (run() reads it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
