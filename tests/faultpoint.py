"""Run `adapters ARGS` in this process with a fault point: the Nth call of a function raises Fault.

    python tests/faultpoint.py MODULE:ATTRIBUTE.PATH N ARGS...

Fault is a BaseException, which no handler of the code under test catches: it does to the thread that meets it what
a bug past every handler does. Tests in this process put `raising` on an instance with monkeypatch instead.
"""

from __future__ import annotations

import functools
import pkgutil
import sys
from collections.abc import Callable
from typing import Any


class Fault(BaseException):
    """The failure a fault point injects."""


def raising(original: Callable[..., Any], nth: int) -> Callable[..., Any]:
    """ORIGINAL, except that its NTH call raises Fault instead of running."""
    calls = 0

    @functools.wraps(original)
    def faulty(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == nth:
            raise Fault(f"fault point: call {nth} of {original.__qualname__}")
        return original(*args, **kwargs)

    return faulty


if __name__ == "__main__":
    target, nth = sys.argv[1], int(sys.argv[2])
    owner_name, _, name = target.rpartition(".")
    owner = pkgutil.resolve_name(owner_name)
    setattr(owner, name, raising(getattr(owner, name), nth))
    from adapterctl.cli import main

    main(sys.argv[3:])
