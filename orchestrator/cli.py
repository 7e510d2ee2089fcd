"""`hvbench`: validate every job of the command line first, then hand over to Hydra.

Bad input (unknown group option or key, out-of-range value, a bad trace line) gets one line
naming the key and what is allowed, exit code 2, and nothing is started or written: every job of
a sweep is composed and checked before the first one runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.errors import ConfigCompositionException, HydraException, OverrideParseException
from omegaconf import OmegaConf

from hvmodel.errors import ConfigError
from hydra_plugins.hvbench_launcher import HvbenchExperiments, HvbenchLauncher
from orchestrator.main import app
from orchestrator.scenario import CONF_DIR, EXPERIMENTS_DIR, GROUPS, build_scenario, instantiate_group

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


class UsageError(Exception):
    pass


def _group_options(loader, group: str) -> list[str]:
    return sorted(loader.get_group_options(group))


def _check_choices(loader, overrides) -> None:
    for o in overrides:
        group = o.key_or_group
        if group not in GROUPS or o.is_delete():
            continue
        allowed = _group_options(loader, group)
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for v in values:
            if v not in allowed:
                raise UsageError(f"{group}={v}: unknown {group}; allowed: {', '.join(allowed)}")


def _unknown_key(cfg, key: str) -> str:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if node is None or not OmegaConf.is_dict(node):
        return f"{key}: unknown key"
    allowed = [k for k in node if k != "_target_"]
    return f"{key}: unknown key; allowed: {', '.join(f'{parent}.{k}' if parent else k for k in allowed)}"


def config_name(args: list[str]) -> tuple[str, list[str]]:
    """The primary config of the command line (`-cn NAME`, `--config-name[=]NAME`; an experiment
    of experiments/) and the arguments without it."""
    name, rest, it = "config", [], iter(args)
    for a in it:
        if a in ("-cn", "--config-name"):
            name = next(it, "")
        elif a.startswith("--config-name="):
            name = a.split("=", 1)[1]
        else:
            rest.append(a)
    return name, rest


def _primary(name: str) -> None:
    if name != "config" and not (Path(EXPERIMENTS_DIR) / f"{name.removesuffix('.yaml')}.yaml").is_file():
        allowed = sorted(p.stem for p in Path(EXPERIMENTS_DIR).glob("*.yaml"))
        raise UsageError(f"-cn {name}: unknown experiment; allowed: {', '.join(allowed)}")


def _sweep_params(name: str) -> list[str]:
    """An experiment's own sweep (hydra.sweeper.params): the command line's come after it, and
    a key given on both is the command line's (BasicSweeper.split_arguments)."""
    hydra_cfg = compose(name, return_hydra_config=True).hydra
    return [f"{k}={v}" for k, v in (hydra_cfg.sweeper.params or {}).items()]


def validate(args: list[str]) -> int:
    """Compose and build every job; returns the number of jobs, raises UsageError."""
    name, args = config_name(args)
    multirun = "-m" in args or "--multirun" in args
    overrides = [a for a in args if not a.startswith("-") and not a.startswith("hydra.") and not a.startswith("hydra/")]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        _primary(name)
        parser = OverridesParser.create(config_loader=loader)
        try:
            parsed = parser.parse_overrides(overrides)
        except OverrideParseException as e:
            raise UsageError(str(e).splitlines()[0]) from None
        _check_choices(loader, parsed)
        if not multirun:
            sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
            if sweeps:
                raise UsageError(f"{sweeps[0]}: a sweep needs -m (hvbench -m {' '.join(overrides)})")
        else:
            own = parser.parse_overrides(_sweep_params(name))
            _check_choices(loader, own)
            parsed = own + parsed
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
        base = compose(name)
        for job in jobs:
            try:
                cfg = compose(name, overrides=job)
            except ConfigCompositionException as e:
                msg = str(e.__cause__ or e)
                bad = next((o.split("=")[0].lstrip("+~") for o in job if f"'{o.split('=')[0].lstrip('+~')}'" in str(e)), None)
                raise UsageError(_unknown_key(base, bad) if bad else msg.splitlines()[0]) from None
            except HydraException as e:
                raise UsageError(str(e).splitlines()[0]) from None
            try:
                build_scenario(cfg)
                instantiate_group(cfg, "cluster")
                instantiate_group(cfg, "tracking")
            except ConfigError as e:
                prefix = " ".join(job) + ": " if len(jobs) > 1 else ""
                raise UsageError(prefix + str(e)) from None
    GlobalHydra.instance().clear()
    return len(jobs)


def register_plugins() -> None:
    """Hydra looks for plugins by scanning the hydra_plugins namespace, which an editable install
    cannot list: register the launcher and the experiments' search path by hand."""
    Plugins.instance().register(HvbenchLauncher)
    Plugins.instance().register(HvbenchExperiments)


def main() -> None:
    register_plugins()
    args = sys.argv[1:]
    passthrough = any(a.startswith("-") and a not in ("-m", "--multirun") for a in config_name(args)[1])  # --help, --cfg, ...
    if not passthrough:
        try:
            validate(args)
        except UsageError as e:
            print(f"hvbench: error: {e}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
    try:
        app()
    except KeyboardInterrupt:  # the runs that were running are KILLED in MLflow
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
