"""The compiled engine (hvmodel/fast/src), built by `pip install -e .` with the system C++
compiler; everything else about the package is in pyproject.toml."""

import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the build backend may not put the tree on sys.path
from hvmodel.fast.digest import source_digest  # noqa: E402

setup(
    ext_modules=[
        Pybind11Extension(
            "hvmodel.fast._engine",
            ["hvmodel/fast/src/engine.cpp"],
            cxx_std=17,
            # IEEE double exactly as Python computes it: no fused multiply-add, no fast-math
            extra_compile_args=["-O2", "-ffp-contract=off", "-fno-fast-math"],
            define_macros=[("HV_SOURCE_DIGEST", f'"{source_digest()}"')],
        )
    ],
    cmdclass={"build_ext": build_ext},
)
