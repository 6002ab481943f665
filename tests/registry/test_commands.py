"""Command-line manners like git's: Ctrl-C, killed registrations, remotes, log, diff, completion, bad paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, git, killed_at, sha_tree

from adapterctl.registry.repo import Registry


def _clean(root: Path) -> None:
    """Nothing half done: no stray folders, the index and the tracked files as HEAD has them."""
    assert git(root, "status", "--porcelain") == ""
    assert not [p.name for p in (root / "adapters").iterdir() if p.name.endswith(".previous")]
    assert not (root / ".git" / "adapters-add-in-progress").exists()


def test_ctrl_c_while_registering_exits_130_and_leaves_nothing_half_done(registry: Registry, make_adapter, cli) -> None:
    root = registry.root
    registry.add("support", make_adapter(1))
    before = git(root, "rev-parse", "HEAD")
    for point, nth, when in [
        ("adapterctl.registry.store:track", 1, "after"),  # the new files are in the workspace and the DVC cache
        ("adapterctl.registry.git:Git.create_tags", 1, "before"),  # committed, not yet tagged
    ]:
        child = killed_at(root, point, nth, when, "add", "support", str(make_adapter(2)), signum="SIGINT")
        assert child.returncode == 130, child.stderr
        assert child.stderr.endswith("Interrupted.\n")
        assert git(root, "rev-parse", "HEAD") == before and git(root, "tag") == "support@v1.0.0\n"
        assert sha_tree(root / "adapters" / "support") == sha_tree(make_adapter(1))
        _clean(root)


def test_a_registration_killed_at_any_step_is_undone_or_kept_whole_by_the_next_command(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    import shutil

    registry.add("support", make_adapter(1))
    kills = 0
    for nth in range(1, 40):
        copy = tmp_path / f"kill-{nth}"
        shutil.copytree(registry.root, copy, symlinks=True)
        child = killed_at(
            copy, "adapterctl.registry.git:Git.run", nth, "before", "add", "support", str(make_adapter(2))
        )
        if child.returncode == 0:
            break
        assert child.returncode == -signal.SIGKILL, child.stderr
        kills += 1
        # The next command that takes the lock finds the registration whole or not at all.
        assert cli("promote", "support@v1.0.0", "--stage", "prod", cwd=copy).exit_code == 0
        _clean(copy)
        tags = git(copy, "tag").split()
        expected = make_adapter(2) if "support@v1.1.0" in tags else make_adapter(1)
        assert sha_tree(copy / "adapters" / "support") == sha_tree(expected), nth
        added = cli("add", "support", str(make_adapter(3)), cwd=copy)
        assert added.exit_code == 0, added.output
        shutil.rmtree(copy)
    assert kills >= 5


def test_remote_add_refuses_a_path_that_is_not_a_repository_unless_asked_to_create_one(
    registry: Registry, tmp_path: Path, cli
) -> None:
    root = registry.root
    typo = tmp_path / "typo" / "path.git"
    refused = cli("remote", "add", "backup", str(typo), cwd=root)
    assert refused.exit_code == 6
    assert refused.stderr == (
        f"Error: {typo} is not a git repository; check the path, or pass --create to make an empty one there.\n"
    )
    assert not typo.exists() and "backup" not in git(root, "remote").split()
    inside = tmp_path / "registry" / "adapters"  # a folder inside a repository is not one
    assert cli("remote", "add", "backup", str(inside), cwd=root).exit_code == 6
    created = cli("remote", "add", "backup", str(typo), "--create", cwd=root)
    assert created.exit_code == 0, created.output
    assert (typo / "HEAD").is_file()
    verbose = cli("remote", "-v", cwd=root)
    assert verbose.output.splitlines() == [
        f"backup\tgit {typo}\tdvc {typo.resolve() / 'dvc'}",
        f"origin (default)\tgit {tmp_path / 'origin.git'}\tdvc {(tmp_path / 'origin.git').resolve() / 'dvc'}",
    ]
    assert cli("remote", cwd=root).output == "backup\norigin\n"
    assert cli("remote", "remove", "backup", cwd=root).output == "Removed remote backup.\n"
    assert cli("remote", cwd=root).output == "origin\n"
    assert "backup" not in (root / ".dvc" / "config").read_text()
    assert git(root, "status", "--porcelain") == ""
    assert cli("remote", "remove", "backup", cwd=root).exit_code == 6


def test_log_across_adapters_with_a_limit_and_diff_exits_1_when_versions_differ(
    registry: Registry, make_adapter, cli
) -> None:
    root = registry.root
    registry.add("support", make_adapter(1))
    registry.add("contacts", make_adapter(2))
    registry.add("support", make_adapter(3))
    log = json.loads(cli("log", "--json", cwd=root).output)
    assert [v["ref"] for v in log["versions"]] == ["support@v1.1.0", "contacts@v1.0.0", "support@v1.0.0"]
    limited = json.loads(cli("log", "-n", "2", "--json", cwd=root).output)
    assert [v["ref"] for v in limited["versions"]] == ["support@v1.1.0", "contacts@v1.0.0"]
    assert cli("log", "-h", cwd=root).output.startswith("Usage: ")
    differ = cli("diff", "support@v1.0.0", "support@v1.1.0", cwd=root)
    assert differ.exit_code == 1 and differ.output.startswith("--- support@v1.0.0\n+++ support@v1.1.0\n")
    same = cli("diff", "support@v1.0.0", "support@v1.0.0", cwd=root)
    assert same.exit_code == 0 and same.output == "--- support@v1.0.0\n+++ support@v1.0.0\n"


def test_shell_completion_offers_adapter_names_and_references(registry: Registry, make_adapter) -> None:
    registry.add("support", make_adapter(1))
    registry.promote("support@v1.0.0", "prod")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "_ADAPTERS_COMPLETE": "bash_complete", "COMP_CWORD": "2"}

    def complete(words: str) -> list[str]:
        proc = subprocess.run(
            [sys.executable, "-c", "from adapterctl.cli import main; main(prog_name='adapters')"],
            cwd=registry.root,
            env={**env, "COMP_WORDS": words},
            capture_output=True,
            text=True,
        )
        return [line.split(",", 1)[1] for line in proc.stdout.splitlines()]

    assert complete("adapters checkout sup") == ["support", "support@latest", "support@v1.0.0", "support#prod"]
    assert complete("adapters rollback s") == ["support"]


@pytest.mark.parametrize("args", [("init", "{file}"), ("checkout", "support@v1.0.0", "-o", "{file}")])
def test_a_file_where_a_folder_is_wanted_is_one_clear_line(
    registry: Registry, make_adapter, tmp_path: Path, cli, args: tuple[str, ...]
) -> None:
    registry.add("support", make_adapter(1))
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    result = cli(*[a.format(file=file) for a in args], cwd=registry.root)
    assert result.exit_code in (5, 7) and result.stderr.startswith(f"Error: {file} ")
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert file.read_text() == "mine\n"


def test_clone_of_a_repository_that_is_not_a_registry_leaves_nothing_behind(tmp_path: Path, cli) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    git(plain, "init", "--quiet")
    git(plain, "commit", "--quiet", "--allow-empty", "-m", "code")
    result = cli("clone", str(plain), str(tmp_path / "copy"), cwd=tmp_path)
    assert result.exit_code == 5
    assert result.stderr == f"Error: {plain} is not an adapter repository (no .dvc/ and adapters/); nothing was kept.\n"
    assert not (tmp_path / "copy").exists()


def test_registering_keeps_dvc_yaml_comments_and_commits_none_of_your_other_edits(
    registry: Registry, make_adapter, cli
) -> None:
    root = registry.root
    registry.add("support", make_adapter(1))
    project = root / "dvc.yaml"
    project.write_text("# Adapters of the support team.\n" + project.read_text())
    git(root, "commit", "--quiet", "-am", "Comment dvc.yaml")
    (root / "notes.md").write_text("draft\n")
    git(root, "add", "notes.md")  # staged, not for the registration commit
    edited = project.read_text() + "params:\n- params.yaml\n"  # a user's unrelated, uncommitted edit
    project.write_text(edited)
    assert cli("add", "contacts", str(make_adapter(2)), cwd=root).exit_code == 0
    committed = git(root, "show", "HEAD:dvc.yaml")
    assert committed.startswith("# Adapters of the support team.\n")
    assert "contacts:" in committed and "params" not in committed
    assert git(root, "show", "--name-only", "--format=", "HEAD").split() == [
        "adapters/.gitignore",
        "adapters/contacts.dvc",
        "dvc.yaml",
    ]
    workspace = project.read_text()
    assert workspace.startswith("# Adapters of the support team.\n") and "params:\n- params.yaml\n" in workspace
    assert "contacts:" in workspace
    assert sorted(git(root, "status", "--porcelain").splitlines()) == [" M dvc.yaml", "A  notes.md"]
