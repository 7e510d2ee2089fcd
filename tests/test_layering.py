"""hvmodel/ is the emulator alone: it must import and run with ray, hydra, mlflow and omegaconf
absent (DESIGN.md §2)."""

import subprocess
import sys

from conftest import REPO

BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('ray', 'hydra', 'mlflow', 'omegaconf'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import pkgutil, importlib, hvmodel, hvmodel.strategies
for m in pkgutil.walk_packages(hvmodel.__path__, 'hvmodel.'):
    importlib.import_module(m.name)
from hvmodel.engine import simulate
from hvmodel.host import Topology
from hvmodel.workloads.partitioned_pinned import PartitionedPinned
from hvmodel.strategies.upstream import Upstream
topo = Topology(nr_cpus=8, smt=2)
_, s = simulate(PartitionedPinned(duration_s=0.2).trace(topo, 1), topo, Upstream())
assert s["events"] > 0
print('ok', sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'hydra', 'mlflow', 'omegaconf')))
"""


def test_hvmodel_imports_and_runs_without_orchestration_stack():
    out = subprocess.run([sys.executable, "-c", BLOCK], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok []"
