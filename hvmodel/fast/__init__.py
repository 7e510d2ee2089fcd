"""The fast engine: hvmodel's model compiled from C++ (src/), identical to the reference engine.

The C++ is built once, at install (`pip install -e .`, which `make` runs), by setup.py with
the system compiler; hvmodel.fast.engine refuses an extension built from other sources.
"""
