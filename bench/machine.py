"""What the numbers were measured on."""
import os
import platform
import socket
import subprocess

import psutil

import uringsend


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit():
    """The source tree's commit, '+' when tracked files in uringsend/ have uncommitted changes
    (None outside git)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(uringsend.__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "uringsend"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def describe():
    probe = uringsend.probe()
    return {
        "host": socket.gethostname(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpu_model": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "python": platform.python_version(),
        "uringsend": uringsend.__version__,
        "uringsend_commit": _commit(),
        "io_uring_setup_flags": list(probe.setup_flags),
        "uringsend_modes": list(probe.modes),
        "pipe_max_size": probe.pipe_max_size,
        "memlock_soft": probe.memlock_soft,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
