"""Import an algorithm script (algos/<name>.py) as a module, for benchmarks and tables.

The module is registered in sys.modules before it runs: the scripts' dataclasses need it."""

from __future__ import annotations

import importlib.util
import os
import sys

ALGOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos")


def load_script(name: str, prefix: str = "algos"):
    module_name = f"{prefix}_{name}"
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ALGOS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
