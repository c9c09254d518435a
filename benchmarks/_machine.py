"""What every benchmark prints about the machine that measured it."""

import platform
import subprocess


def cpu_model() -> str:
    """``lscpu``'s model name (e.g. "AMD EPYC 9R14"), or what ``platform`` knows when lscpu is missing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"
