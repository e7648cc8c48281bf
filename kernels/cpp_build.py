"""How the CPU C++ ops (sgmv_cpu.cpp, cpu_paged_attention.cpp, cpu_rms_norm.cpp,
cpu_rope.cpp) are built: on first use, with torch.utils.cpp_extension, into a cache
directory of the user's, once per machine.

The directory is keyed by the source and the headers beside it (cpu_bf16.h), the flags,
torch, Python and the CPU's flags, so a -march=native build never meets another CPU
through a shared home directory, and an edited source or header rebuilds. ninja comes
from the pip package when it is not on PATH (a virtualenv that is not activated).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CFLAGS = ["-O3", "-march=native", "-fopenmp"]   # -fopenmp: at::parallel_for is OpenMP in the header


def build_dir(name: str, source: Path, cflags: list[str]) -> str:
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("flags")), "")
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]   # what the sources may include
    key = hashlib.sha256(b"\0".join([
        source.read_bytes(), *headers, " ".join(cflags).encode(), torch.__version__.encode(),
        platform.python_version().encode(), platform.machine().encode(), cpu.encode(),
    ])).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "loraserve", "torch_extensions", f"{name}-{key}")


def load(name: str, source: Path, what: str, cflags: list[str] = CFLAGS):
    """The compiled module `loraserve_<name>`; raises when it cannot be built. `what` names
    the op in the one log line a first build writes."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    directory = build_dir(name, source, cflags)
    if not os.path.isdir(directory):
        logger.info("building %s once for this machine in %s", what, directory)
    os.makedirs(directory, exist_ok=True)
    return cpp_extension.load(name=f"loraserve_{name}", sources=[str(source)], build_directory=directory,
                              extra_cflags=cflags, extra_ldflags=["-fopenmp"], verbose=False)
