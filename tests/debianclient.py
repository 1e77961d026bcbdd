"""Debian 12's own python3-kubernetes (22.x), which the .deb depends on: is it here to test against?"""

from __future__ import annotations

import functools
import os
import subprocess

SYSTEM_PYTHON = "/usr/bin/python3"


@functools.cache
def has_debian_client() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import kubernetes, yaml; print(kubernetes.__version__)"],
                           capture_output=True, text=True, check=False, env={"PATH": "/usr/bin:/bin"})
    return probe.returncode == 0 and probe.stdout.startswith(("22.", "23.", "24.", "25.", "26."))
