"""Hydra loads plugins only from the hydra_plugins namespace package: this makes the launcher of
orchestrator/launcher.py available as hydra/launcher=hvbench, and puts experiments/ on the config
search path (`hvbench -cn NAME -m` runs experiments/NAME.yaml)."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from orchestrator import launcher
from orchestrator.scenario import EXPERIMENTS_DIR


class HvbenchLauncher(launcher.HvbenchLauncher):
    __doc__ = launcher.HvbenchLauncher.__doc__


class HvbenchExperiments(SearchPathPlugin):
    """experiments/ after conf/: an experiment is a primary config whose defaults start with
    `config` (conf/config.yaml) and override its groups."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="hvbench-experiments", path=f"file://{EXPERIMENTS_DIR}")
