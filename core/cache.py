"""The user cache folder, file locks, atomic writes and the timestamp format every record uses."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def home() -> Path:
    """The user directory for caches: $ADAPTERS_HOME, else $XDG_CACHE_HOME/adapters, else ~/.cache/adapters."""
    if os.environ.get("ADAPTERS_HOME"):
        return Path(os.environ["ADAPTERS_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "adapters"


@contextlib.contextmanager
def locked(path: Path, wait: bool = True, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file PATH; BlockingIOError when taken and not waiting.

    WAITING, when given, is printed to stderr before blocking on a lock another process holds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def write_atomic(path: Path, text: str) -> None:
    """Write PATH whole or not at all: a temp file beside it, then a rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def utc(seconds: float | None = None) -> str:
    """A time (default: now) as UTC ISO 8601, as every record and report writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
