"""The code passes ``ruff check`` with the project's settings (pyproject.toml: pyflakes, pycodestyle, 120 columns)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_is_clean():
    pytest.importorskip('ruff', reason='ruff is in requirements.txt; install it to lint')
    proc = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', '.'], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
