"""Hydra loads launcher plugins only from the hydra_plugins namespace package: this makes the
launcher of orchestrator/launcher.py available as hydra/launcher=hvbench."""

from orchestrator import launcher


class HvbenchLauncher(launcher.HvbenchLauncher):
    __doc__ = launcher.HvbenchLauncher.__doc__
