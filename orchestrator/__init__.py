"""hvbench's orchestration: Hydra configs, Ray shards, MLflow tracking. The only code that
imports hydra, ray or mlflow."""
