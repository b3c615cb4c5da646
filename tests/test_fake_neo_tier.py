"""The fake Forge Neo tier (tests/forge) in a process of its own: its fake host's ``modules``
package cannot share a process with the A1111 fake's of tests/host."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_fake_neo_tier_passes():
    # the limit only stops a hung tier: about 5 minutes on 2 idle cores, several times that on a loaded machine
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/forge"],
                         cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, f"tests/forge failed:\n{run.stdout[-12000:]}\n{run.stderr[-4000:]}"
