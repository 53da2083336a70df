"""Helpers shared by the benchmarks: machine load, results files, child processes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
DEFAULT_CACHE = Path.home() / ".cache" / "mlx-abliteration"


def machine() -> dict:
    """What ran the benchmark, how busy the machine was (other users share the cores), and its GPUs if
    nvidia-smi sees any."""
    info = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": list(os.getloadavg()),
        "python": platform.python_version(),
    }
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        gpus = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        gpus = ""
    if gpus:
        info["gpus"] = gpus.splitlines()
    return info


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def run_child(code: str, *args: str, cgroup: Path | None = None, timeout: float = 3600) -> dict:
    """Run ``code`` in a fresh Python (optionally inside a memory cgroup); it prints one JSON line last.

    Returns that JSON plus ``returncode``; children report their own peak
    RSS (``peak_rss()``), so each measurement starts from an empty process.
    """
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-c", code, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if cgroup is not None:
        (cgroup / "cgroup.procs").write_text(str(proc.pid))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines and proc.returncode == 0 else {}
    result["returncode"] = proc.returncode
    if proc.returncode != 0:
        result["stderr_tail"] = err[-2000:]
    return result


def vm_hwm(pid: int | str = "self") -> int | None:
    """Peak resident set size in bytes of process ``pid`` from Linux's /proc (VmHWM), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """This process's peak resident set size in bytes.

    Linux's VmHWM starts afresh at exec; ru_maxrss would include the RSS
    that the parent had when it forked this process.
    """
    hwm = vm_hwm()
    if hwm is not None:
        return hwm
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def gib(n: float) -> float:
    return round(n / 2**30, 3)
