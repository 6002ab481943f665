"""Plain helpers the tests import: paths, environment variables, JSONL files, git, the `adapters` command as a user
runs it, byte-identical folders. (Fixtures live in conftest.py, which no test imports.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
KILLPOINT = Path(__file__).with_name("killpoint.py")


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for a while, then put back what was there."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_jsonl(path: Path, records: list) -> Path:
    """Write records one JSON document per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def adapters_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real `adapters` command in a child process, as a user's shell would."""
    return subprocess.run(
        [sys.executable, "-m", "adapterctl.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def start_adapters(*args: str, cwd: Path) -> subprocess.Popen:
    """Start the real `adapters` command in a child process without waiting for it (to signal or race it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "adapterctl.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def killed_at(
    root: Path, point: str, nth: int, when: str, *args: str, signum: str = "SIGKILL"
) -> subprocess.CompletedProcess:
    """Run `adapters ARGS` in ROOT, sent SIGNUM at the NTH call of POINT (module:attr), WHEN "before" or "after" it."""
    return subprocess.run(
        [sys.executable, str(KILLPOINT), point, str(nth), when, *args],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "KILLPOINT_SIGNAL": signum},
    )


def git(root: Path, *args: str) -> str:
    """The output of a git command run in ROOT (it must succeed)."""
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def sha_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file in a folder, by name: equal dicts mean byte-identical adapters."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_checks_out(cli: Callable[..., Any], clone: Path, ref: str, expected: Path, out: Path) -> None:
    """`adapters checkout REF` in CLONE writes exactly the files of EXPECTED."""
    result = cli("checkout", ref, "-o", str(out), cwd=clone)
    assert result.exit_code == 0, result.output
    assert sha_tree(out) == sha_tree(expected)


def two_clones(registry: Any, make_adapter: Callable[[int], Path], tmp_path: Path, cli: Callable[..., Any]) -> Path:
    """support@v1.0.0 pushed and cloned as 'mate'; then support@v1.1.0 pushed from the first clone."""
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    mate = tmp_path / "mate"
    assert cli("clone", str(tmp_path / "origin.git"), str(mate), cwd=tmp_path).exit_code == 0
    registry.add("support", make_adapter(2))
    assert cli("push", cwd=registry.root).exit_code == 0
    return mate
