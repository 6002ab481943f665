"""A full disk: nothing is registered that was not stored, and pulls say the disk is full, not the remote.

The disk is real: a small tmpfs mounted for the test (root and a mount permission are needed, as on CI machines;
elsewhere the tests skip).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import git, sha_tree

from adapterctl.registry.repo import Registry


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount tmpfs file systems of a given size (e.g. "600k") under TMP_PATH; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small file system here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def _big(make_adapter: Callable[[int], Path], tmp_path: Path, megabytes: int = 2) -> Path:
    """A real adapter with a large extra file beside it (what a bigger adapter weighs)."""
    folder = tmp_path / "big-adapter"
    shutil.copytree(make_adapter(1), folder)
    (folder / "notes.txt").write_bytes(os.urandom(megabytes << 20))
    return folder


def _fill(disk: Path) -> None:
    """Leave DISK with about 300 KB free."""
    free = shutil.disk_usage(disk).free
    (disk / "ballast").write_bytes(b"\0" * max(free - (300 << 10), 0))


def test_add_on_a_full_cache_registers_nothing_and_says_why(
    registry: Registry, make_adapter, tmp_path: Path, cli, small_disk
) -> None:
    disk = small_disk("3m")
    _fill(disk)
    (registry.root / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {disk / 'cache'}\n")
    head = git(registry.root, "rev-parse", "HEAD")
    result = cli("add", "big", str(_big(make_adapter, tmp_path)), cwd=registry.root)
    assert result.exit_code == 5
    assert result.stderr.strip() == (
        f"Error: Adapter files could not be stored in the DVC cache at {disk / 'cache'}: No space left on device; "
        "nothing changed."
    )
    assert git(registry.root, "tag", "--list") == "" and git(registry.root, "rev-parse", "HEAD") == head
    assert not (registry.root / "adapters" / "big").exists() and not (registry.root / "adapters" / "big.dvc").exists()
    assert not [p for p in (disk / "cache").rglob("*.tmp")]  # no partial copy left filling the disk
    assert json.loads(cli("list", "--json", cwd=registry.root).output) == []


def test_pull_into_a_full_disk_says_the_disk_is_full(
    registry: Registry, make_adapter, tmp_path: Path, cli, small_disk
) -> None:
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    mate = tmp_path / "mate"
    assert cli("clone", str(tmp_path / "origin.git"), str(mate), cwd=tmp_path).exit_code == 0
    registry.add("support", _big(make_adapter, tmp_path))
    assert cli("push", cwd=registry.root).exit_code == 0

    disk = small_disk("3m")
    _fill(disk)
    (mate / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {disk / 'cache'}\n")
    head = git(mate, "rev-parse", "HEAD")
    result = cli("pull", cwd=mate)
    assert result.exit_code == 5, result.output
    assert "could not be stored in the DVC cache" in result.stderr and "No space left on device" in result.stderr
    assert "remote" not in result.stderr.split("cache at")[0]  # the remote is not blamed
    assert git(mate, "rev-parse", "HEAD") == head
    assert sha_tree(mate / "adapters" / "support") == sha_tree(make_adapter(1))


def test_clone_into_a_full_disk_says_so_and_leaves_nothing(
    registry: Registry, make_adapter, tmp_path: Path, cli, small_disk
) -> None:
    registry.add("support", _big(make_adapter, tmp_path))
    assert cli("push", cwd=registry.root).exit_code == 0
    disk = small_disk("3m")
    _fill(disk)
    result = cli("clone", str(tmp_path / "origin.git"), str(disk / "clone"), cwd=tmp_path)
    assert result.exit_code in (5, 9), result.output
    assert "No space left on device" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (disk / "clone").exists()


def test_verify_finds_a_version_whose_files_the_cache_lost_entirely(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry.add("support", make_adapter(1))
    cache = registry.root / ".dvc" / "cache"
    shutil.rmtree(cache)  # emptied: the folder's file list is gone too, so nothing says what to hash
    lost = cli("verify", cwd=registry.root)
    assert lost.exit_code == 8
    assert lost.output == (
        "support@v1.0.0: file list missing here; fix: no remote has it: register it again from its source folder\n"
        "1 versions checked here: 1 problem.\n"
    )


def test_verify_names_the_pull_that_restores_the_branch_own_version(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    shutil.rmtree(registry.root / ".dvc" / "cache")
    pulled = cli("verify", cwd=registry.root)
    assert pulled.exit_code == 8
    assert pulled.output.splitlines()[0] == "support@v1.0.0: file list missing here; fix: adapters pull support@v1.0.0"
