"""Tags the registry did not write (plain git, GTO, other artifacts) never break it; deleted tags stay deleted."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from adapterctl.core.errors import NotFound
from adapterctl.registry.repo import Registry


def _git(root: Path, *args: str, date: str | None = None) -> str:
    env = {**os.environ, "GIT_COMMITTER_DATE": date} if date else None
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True, env=env).stdout


def _tags(root: Path) -> list[str]:
    return sorted(_git(root, "tag").split())


def test_a_malformed_tag_pushed_by_plain_git_is_skipped_with_one_warning_everywhere(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    root = registry.root
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=root).exit_code == 0
    _git(root, "tag", "-a", "foo@v01.0.0", "-m", "by hand")
    _git(root, "push", "--quiet", "origin", "foo@v01.0.0")
    warning = "Warning: ignoring tags that are not adapter versions: foo@v01.0.0 (not in the registry's tag grammar).\n"
    mate = tmp_path / "mate"
    cloned = cli("clone", str(tmp_path / "origin.git"), str(mate), cwd=tmp_path)
    assert cloned.exit_code == 0, cloned.output
    assert cloned.stderr == warning  # once per command, not once per read
    for args in (("list",), ("pull",), ("status",), ("log", "support"), ("show", "support")):
        result = cli(*args, cwd=mate)
        assert result.exit_code == 0, (args, result.output)
        assert result.stderr == warning, args
    assert list(Registry(mate).state().adapters) == ["support"]  # what the server's catalog reads
    # Deleted on the remote and here: gone for good, the remote-tag cache is pruned on the next pull.
    _git(tmp_path / "origin.git", "tag", "-d", "foo@v01.0.0")
    _git(mate, "tag", "-d", "foo@v01.0.0")
    pulled = cli("pull", cwd=mate)
    assert pulled.exit_code == 0 and pulled.stderr == ""
    assert "foo@v01.0.0" not in _git(mate, "for-each-ref", "--format=%(refname)")
    assert cli("list", cwd=mate).stderr == ""


def test_a_stage_tag_deleted_on_the_remote_and_here_does_not_come_back(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    root = registry.root
    registry.add("support", make_adapter(1))
    registry.promote("support@v1.0.0", "staging")
    assert cli("push", cwd=root).exit_code == 0
    mate = tmp_path / "mate"
    assert cli("clone", str(tmp_path / "origin.git"), str(mate), cwd=tmp_path).exit_code == 0
    assert cli("pull", cwd=mate).exit_code == 0  # the remote-tag cache now holds support#staging#1
    _git(tmp_path / "origin.git", "tag", "-d", "support#staging#1")
    _git(mate, "tag", "-d", "support#staging#1")
    assert cli("pull", cwd=mate).exit_code == 0
    assert _tags(mate) == ["support@v1.0.0"]
    pushed = cli("push", cwd=mate)
    assert pushed.output == "Everything is already on origin.\n"
    assert _tags(tmp_path / "origin.git") == ["support@v1.0.0"]


def test_a_version_number_past_the_largest_is_refused_and_leaves_no_tag_or_commit(
    registry: Registry, make_adapter, cli
) -> None:
    root = registry.root
    added = cli("add", "y", str(make_adapter(1)), "--version", "999999.999999.999999", cwd=root)
    assert added.exit_code == 0, added.output
    tags, head = _tags(root), _git(root, "rev-parse", "HEAD")
    again = cli("add", "y", str(make_adapter(2)), cwd=root)
    assert again.exit_code == 2
    assert again.stderr == (
        "Error: y@v999999.999999.999999 has no next minor version (each part is at most 999999); "
        "give --version or another --bump.\n"
    )
    assert _tags(root) == tags and _git(root, "rev-parse", "HEAD") == head
    assert _git(root, "status", "--porcelain") == ""
    assert cli("list", cwd=root).exit_code == 0


def test_another_artifact_registered_with_gto_is_skipped_not_a_crash(registry: Registry, make_adapter, cli) -> None:
    from gto.api import register

    root = registry.root
    registry.add("support", make_adapter(1))
    register(str(root), "dataset", "HEAD")
    status = cli("status", "--json", cwd=root)
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["unpushed_tags"] == ["support@v1.0.0"]
    assert "dataset@v0.0.1 (its commit holds no adapter" in status.stderr
    assert [row["name"] for row in json.loads(cli("list", "--json", cwd=root).stdout)] == ["support"]
    with pytest.raises(NotFound):
        Registry(root).state().resolve("dataset")


def test_gto_deprecation_and_deregistration_are_honoured_as_gto_reads_them(
    registry: Registry, make_adapter, cli
) -> None:
    from gto.api import show

    root = registry.root
    registry.add("support", make_adapter(1))
    registry.add("support", make_adapter(2))
    registry.add("other", make_adapter(3))
    last = Registry(root).state().adapters["support"].last_date
    # GTO's own tag names, dated after everything else as `gto deregister` / `gto deprecate` would be.
    _git(root, "tag", "-a", "support@v1.1.0!#1", "support@v1.1.0^{}", "-m", "deregister", date=f"{last + 10} +0000")
    assert json.loads(cli("show", "support", "--json", cwd=root).stdout)["ref"] == "support@v1.0.0"
    assert show(str(root), "support", table=True)[0][0]["version"] == "v1.0.0"  # GTO agrees
    _git(root, "tag", "-a", "other@deprecated#1", "HEAD", "-m", "deprecate", date=f"{last + 20} +0000")
    assert [row["name"] for row in json.loads(cli("list", "--json", cwd=root).stdout)] == ["support"]
    assert [row["name"] for row in show(str(root), table=True)[0]] == ["support"]  # GTO agrees
    # A deregistered number stays taken: the next version goes past it.
    added = cli("add", "support", str(make_adapter(4)), cwd=root)
    assert added.output.startswith("Registered support@v1.2.0 ")
