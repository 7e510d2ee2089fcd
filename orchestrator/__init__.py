"""hvbench's orchestration: Hydra configs, Ray shards, MLflow tracking. The only code that
imports hydra, ray or mlflow."""

import os

# One BLAS thread: the emulator does no linear algebra, and OpenBLAS's idle threads spin on the
# cores the shards need. Set before numpy is imported (a local Ray's shard actors inherit it; a cluster's get it from sharding.WORKER_ENV).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
