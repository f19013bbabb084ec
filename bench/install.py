"""What the benchmark needs besides the project: Debian's wrk and a Java runtime (for TorchServe), and the
`bench` extra (torchserve, torch-model-archiver). Installed through their normal clients when missing."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBIAN_PACKAGES = {"wrk": "wrk", "java": "openjdk-17-jre-headless"}  # command -> package


def missing(torchserve: bool) -> list[str]:
    """What is missing, as the names of what provides it (Debian packages, `.[bench]`)."""
    needed = {"wrk": DEBIAN_PACKAGES["wrk"]}
    if torchserve:
        needed["java"] = DEBIAN_PACKAGES["java"]
    absent = [package for command, package in needed.items() if shutil.which(command) is None]
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    if torchserve and (importlib.util.find_spec("ts") is None or not archiver.exists()):
        absent.append(".[bench]")
    return absent


def ensure(torchserve: bool) -> None:
    """Install what is missing; raise with what to do where that is not possible."""
    absent = missing(torchserve)
    debian = [package for package in absent if package != ".[bench]"]
    if debian:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            raise RuntimeError(f"install Debian's {' '.join(debian)} (needs apt-get as root)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *debian], check=True, env=env, timeout=1200
        )
    if ".[bench]" in absent:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "-e", f"{REPO}[bench]"], check=True, timeout=1200
        )
