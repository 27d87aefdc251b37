"""Describe the machine, the temp filesystem and the library versions of a run."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .peers import ADAPTERS


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def filesystem_of(path: Path) -> str:
    """Return "fstype (device, mount point)" of the mount holding ``path``."""
    real = os.path.realpath(path)
    best: tuple[str, str, str] = ("", "unknown", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best[0]):
                best = (mount, fstype, device)
    except OSError:
        pass
    return f"{best[1]} ({best[2]} on {best[0] or '?'})"


def git_head(repo: Path) -> str:
    """Return the repo's HEAD commit, with "+dirty" when the work tree has changes."""
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True,
                              text=True, timeout=10)
    try:
        if git("rev-parse", "--git-dir").returncode != 0:
            return f"not a git checkout ({repo})"
        head = git("rev-parse", "--short", "HEAD").stdout.strip() or "no commits"
        return head + ("+dirty" if git("status", "--porcelain").stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def collect(tmp_root: Path, repo: Path, mode: str, unavailable: dict[str, str]) -> dict[str, Any]:
    """Return the header facts for the report and the JSON file."""
    versions = {}
    for cls in ADAPTERS:
        if cls.name in unavailable:
            versions[cls.name] = f"unavailable: {unavailable[cls.name]}"
        else:
            details = cls.details()
            versions[cls.name] = cls.version() + (f" ({details})" if details else "")
    return {
        "date": dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "mode": mode,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "tmp_dir": str(tmp_root),
        "tmp_filesystem": filesystem_of(tmp_root),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "repo_head": git_head(repo),
        "versions": versions,
    }
