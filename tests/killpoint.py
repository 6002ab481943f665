"""Run `adapters ARGS` in this process and SIGKILL it at a named fault point: the Nth call of a function.

    python tests/killpoint.py MODULE:ATTRIBUTE.PATH N before|after ARGS...

The kill lands just before that call runs or just after it returns, so a test knows exactly what was and
was not done; the exit status -9 shows that it landed. KILLPOINT_SIGNAL=SIGINT sends Ctrl-C's signal instead.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from typing import Any


def arm(target: str, nth: int, when: str) -> None:
    """Make the NTH call of TARGET (module:attr.path) kill this process WHEN ("before" or "after") it runs."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = 0
    signum = getattr(signal, os.environ.get("KILLPOINT_SIGNAL", "SIGKILL"))

    @functools.wraps(original)
    def killing(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == nth and when == "before":
            os.kill(os.getpid(), signum)
        result = original(*args, **kwargs)
        if calls == nth and when == "after":
            os.kill(os.getpid(), signum)
        return result

    setattr(owner, name, killing)


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    from adapterctl.cli import main

    main(sys.argv[4:])
