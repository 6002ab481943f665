"""A file the registry cannot read, or a project file of the wrong shape: one line and an exit code, never a trace.

The machine's tests run as root, whom file modes do not stop, so an unreadable file is a shim at the one place that
reads it (a PermissionError as the system gives one), never a real mode-000 file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import git

from adapterctl.registry import store
from adapterctl.registry.repo import Registry


def _unreadable(monkeypatch: pytest.MonkeyPatch, module: object, name: str, path: Path) -> None:
    """Make MODULE.NAME(path, ...) fail for PATH as reading a mode-000 file does."""
    real = getattr(module, name)

    def refuse(target: object, *args: object, **kwargs: object) -> object:
        if Path(str(target)) == path:
            raise PermissionError(13, "Permission denied", str(path))
        return real(target, *args, **kwargs)

    monkeypatch.setattr(module, name, refuse)


def _cached(registry: Registry, relpath: str) -> Path:
    """Where the local cache holds the current version's RELPATH."""
    with store.opened(registry.root) as objects:
        md5 = store.dir_md5((registry.root / "adapters" / "support.dvc").read_text())
        entry = next(e for e in objects.listing(md5) if e["relpath"] == relpath)
        return objects._path(entry["md5"])


def test_checkout_of_an_unreadable_cache_file_is_one_line(
    registry: Registry, make_adapter, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add("support", make_adapter(1))
    cached = _cached(registry, "adapter_model.safetensors")
    _unreadable(monkeypatch, store, "file_md5", cached)
    result = cli("checkout", "support", "-o", str(tmp_path / "out"), cwd=registry.root)
    assert result.exit_code == 5
    assert result.stderr == f"Error: {cached}: Permission denied.\n"
    assert not (tmp_path / "out").exists()


def test_status_with_an_unreadable_workspace_file_is_one_line(
    registry: Registry, make_adapter, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add("support", make_adapter(1))
    weights = registry.root / "adapters" / "support" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # edited, so status must read it again
    _unreadable(monkeypatch, store, "file_md5", weights)
    result = cli("status", cwd=registry.root)
    assert result.exit_code == 5
    assert result.stderr == f"Error: {weights}: Permission denied.\n"


def test_add_of_a_folder_with_an_unreadable_file_registers_nothing(
    registry: Registry, make_adapter, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_adapter(1)
    _unreadable(monkeypatch, os, "open", folder / "lineage.json")
    result = cli("add", "support", str(folder), cwd=registry.root)
    assert result.exit_code == 5
    assert (
        result.stderr == f"Error: Cannot read {folder / 'lineage.json'}: Permission denied; nothing was registered.\n"
    )
    assert git(registry.root, "tag", "--list") == "" and not (registry.root / "adapters" / "support").exists()


@pytest.mark.parametrize("text", ["- a list\n", "artifacts: [one, two]\n", "artifacts: {unclosed\n"])
def test_add_with_a_committed_project_file_of_the_wrong_shape_is_one_line(
    registry: Registry, make_adapter, cli, text: str
) -> None:
    (registry.root / "dvc.yaml").write_text(text)
    git(registry.root, "add", "dvc.yaml")
    git(registry.root, "commit", "-qm", "odd dvc.yaml")
    head = git(registry.root, "rev-parse", "HEAD")
    result = cli("add", "support", str(make_adapter(1)), cwd=registry.root)
    assert result.exit_code == 5
    assert len(result.stderr.splitlines()) == 1 and "dvc.yaml" in result.stderr
    assert git(registry.root, "rev-parse", "HEAD") == head and git(registry.root, "tag", "--list") == ""
    assert json.loads(cli("list", "--json", cwd=registry.root).output) == []


def test_verify_with_an_unreadable_cache_file_blames_this_disk_not_the_remote(
    registry: Registry, make_adapter, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add("support", make_adapter(1))
    cached = _cached(registry, "adapter_config.json")
    real = store._object_md5

    def refuse(odb: object, md5: str) -> str | None:
        if cached.name == md5[2:]:
            raise PermissionError(13, "Permission denied", str(cached))
        return real(odb, md5)

    monkeypatch.setattr(store, "_object_md5", refuse)
    result = cli("verify", cwd=registry.root)
    assert result.exit_code == 5
    assert result.stderr == f"Error: Reading the local DVC cache failed: [Errno 13] Permission denied: '{cached}'.\n"
