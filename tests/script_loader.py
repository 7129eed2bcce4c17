"""The tests' way to import a top-level script (``train_*.py``, ``test_*.py``, ``preprocess_*.py``) by its path.

Scripts are imported under a private module name, so ``test_egohmr.py`` (a script) never meets
``tests/test_egohmr.py`` (its tests) in ``sys.modules``.
"""
from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f'_script_{name}', os.path.join(ROOT, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
