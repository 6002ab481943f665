"""Small C kernels built with the system's C compiler the first time a process needs them (a fraction of a second).

Where no compiler works, `build` answers None and the caller keeps its torch path, which gives the same result.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger("serve")


def function(source: Path, name: str, argtypes: list[Any]) -> Any:
    """The C function NAME (returning an int status) of SOURCE built, or None where it cannot be built."""
    library = build(source)
    if library is None:
        return None
    built = getattr(library, name)
    built.restype, built.argtypes = ctypes.c_int, argtypes
    return built


@cache
def build(source: Path) -> ctypes.CDLL | None:
    """SOURCE built and loaded, or None where it cannot be built."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("No C compiler: %s is not built; its torch path is used.", source.name)
        return None
    with tempfile.TemporaryDirectory() as folder:
        built = Path(folder) / source.with_suffix(".so").name
        # -fopenmp links libgomp.so.1, which resolves to the copy torch already loaded: one thread team for both.
        command = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(built), str(source)]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=120)
            return ctypes.CDLL(str(built))  # mapped: the file may go once loaded
        except (OSError, subprocess.SubprocessError) as exc:
            log.info("Building %s failed (%s): its torch path is used.", source.name, exc)
            return None
