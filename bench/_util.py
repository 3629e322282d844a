"""Helpers shared by the benchmarks: run one measurement in a fresh process, peak memory."""

from __future__ import annotations

import json
import resource
import subprocess
import sys


def rss_mb() -> float:
    """Current resident memory of this process in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb(since: float = 0.0) -> float:
    """Peak resident memory of this process in MiB, minus ``since`` (an earlier :func:`rss_mb`)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - since


def run_child(script: str, args: list[str]) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter; its last stdout line is a JSON result."""
    out = subprocess.run([sys.executable, script, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
