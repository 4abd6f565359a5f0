"""``python -m invcoss.cli`` runs the same group as ``invcoss-cli`` (what ``torchrun -m invcoss.cli`` needs)."""

from __future__ import annotations

import subprocess
import sys

from invcoss import __version__


def test_python_dash_m_runs_the_cli():
    p = subprocess.run([sys.executable, "-m", "invcoss.cli", "--version"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"invcoss-cli, version {__version__}"
    p = subprocess.run(
        [sys.executable, "-m", "invcoss.cli", "no-such-command"], capture_output=True, text=True
    )
    assert p.returncode == 2 and "No such command" in p.stderr
