"""The user's git setup never breaks the registry: hooks, signing, default branch, line endings, shallow clones,
a detached HEAD, a merge a killed pull left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import assert_checks_out, git, killed_at, sha_tree, two_clones

from adapterctl.registry.repo import Registry
from adapterctl.registry.remotes import set_remote

# Every hook the registry's own commits, merges, checkouts and ref updates would run, each one failing loudly.
_HOOKS = [
    "pre-commit", "prepare-commit-msg", "commit-msg", "post-commit", "pre-merge-commit", "post-merge",
    "post-checkout", "reference-transaction", "post-rewrite",
]  # fmt: skip


@pytest.fixture
def user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Set the user's global git config (and nothing of the machine's) for this test: configure(KEY=VALUE, ...)."""
    path = tmp_path / "gitconfig"
    path.touch()
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(path))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")

    def configure(**values: str) -> Path:
        for key, value in values.items():
            git(tmp_path, "config", "--global", key.replace("__", "."), value)
        return path

    return configure


def _registry(tmp_path: Path) -> Registry:
    """A new registry with a bare remote 'origin', made under the config the test has set."""
    registry, _ = Registry.init(tmp_path / "registry")
    set_remote(registry, "origin", str(tmp_path / "origin.git"), None, {}, create=True)
    return registry


def _failing_hooks(folder: Path, names: list[str]) -> Path:
    folder.mkdir(exist_ok=True)
    for name in names:
        hook = folder / name
        hook.write_text(f"#!/bin/sh\necho 'the {name} hook refuses' >&2\nexit 1\n")
        hook.chmod(0o755)
    return folder


def _tags(root: Path) -> list[str]:
    return sorted(git(root, "tag").split())


def test_failing_hooks_never_stop_add_promote_clone_pull_or_a_merge(
    user_config, make_adapter, tmp_path: Path, cli
) -> None:
    hooks = _failing_hooks(tmp_path / "hooks", _HOOKS)
    # The user's global hooks, but reference-transaction: the bare remote here would run it on every push it takes.
    user_config(core__hooksPath=str(_failing_hooks(tmp_path / "global-hooks", _HOOKS[:-2] + _HOOKS[-1:])))
    registry = _registry(tmp_path)
    root = registry.root
    git(root, "config", "core.hooksPath", str(hooks))
    assert cli("add", "support", str(make_adapter(1)), cwd=root).exit_code == 0
    # A registration killed before its tag is undone by the next command (a checkout: post-checkout must not run).
    child = killed_at(
        root, "adapterctl.registry.git:Git.commit_tree", 1, "after", "add", "support", str(make_adapter(4))
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert cli("promote", "support@v1.0.0", "--stage", "prod", cwd=root).exit_code == 0
    assert sha_tree(root / "adapters" / "support") == sha_tree(make_adapter(1))
    pushed = cli("push", cwd=root)
    assert pushed.exit_code == 0, pushed.stderr
    mate = tmp_path / "mate"
    cloned = cli("clone", str(tmp_path / "origin.git"), str(mate), cwd=tmp_path)
    assert cloned.exit_code == 0, cloned.output
    git(mate, "config", "core.hooksPath", str(hooks))
    # Both sides move on: the pull must merge (a merge commit, its hooks, a checkout of the new files).
    assert cli("add", "contacts", str(make_adapter(2)), cwd=root).exit_code == 0
    assert cli("push", cwd=root).exit_code == 0
    assert cli("add", "support", str(make_adapter(3)), cwd=mate).exit_code == 0
    assert cli("rollback", "support", "--stage", "prod", "--to", "support@v1.1.0", cwd=mate).exit_code == 0
    pulled = cli("pull", cwd=mate)
    assert pulled.exit_code == 0, pulled.output
    assert not git(mate, "status", "--porcelain", "--untracked-files=no")
    assert len(git(mate, "rev-list", "--parents", "-n", "1", "HEAD").split()) == 3  # a merge commit
    assert sha_tree(mate / "adapters" / "contacts") == sha_tree(make_adapter(2))
    assert cli("push", cwd=mate).exit_code == 0
    # pre-push is the user's say over what leaves the machine: it runs, and its refusal is one line.
    _failing_hooks(hooks, ["pre-push"])
    assert cli("promote", "contacts@v1.0.0", "--stage", "prod", cwd=root).exit_code == 0
    refused = cli("push", cwd=root)
    assert refused.exit_code == 9
    assert refused.stderr == "Error: git push to origin failed: the pre-push hook refuses\n"


def test_a_left_over_merge_is_finished_by_the_next_pull(registry: Registry, make_adapter, tmp_path: Path, cli) -> None:
    mate = two_clones(registry, make_adapter, tmp_path, cli)
    assert cli("add", "support", str(make_adapter(3)), cwd=mate).exit_code == 0  # support@v1.1.0 here too
    # Killed just before the merge commit: the merge is under way, MERGE_HEAD and all.
    child = killed_at(mate, "adapterctl.registry.git:Git.signing", 1, "before", "pull")
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert git(mate, "rev-parse", "-q", "--verify", "MERGE_HEAD")
    assert cli("status", cwd=mate).output.startswith("A pull was interrupted: run `adapters pull` to finish it.\n")
    pulled = cli("pull", cwd=mate)
    assert pulled.exit_code == 0, pulled.output
    assert subprocess.run(["git", "rev-parse", "-q", "--verify", "MERGE_HEAD"], cwd=mate).returncode == 1
    assert len(git(mate, "rev-list", "--parents", "-n", "1", "HEAD").split()) == 3
    assert sha_tree(mate / "adapters" / "support") == sha_tree(make_adapter(3))  # now support@v1.1.1
    assert_checks_out(cli, mate, "support@v1.1.0", make_adapter(2), tmp_path / "theirs")
    assert json.loads(cli("status", "--json", cwd=mate).output)["interrupted_pull"] is False
    # A merge the user began is theirs to finish: refused, nothing changed.
    git(mate, "checkout", "-q", "-b", "side", "HEAD~1")
    git(mate, "commit", "-q", "--allow-empty", "-m", "side")
    git(mate, "checkout", "-q", "main")
    git(mate, "merge", "--no-ff", "--no-commit", "side")
    refused = cli("pull", cwd=mate)
    assert refused.exit_code == 7
    assert refused.stderr == (
        "Error: A merge is in progress here that adapters did not start: conclude it (`git commit`) or abandon it "
        "(`git merge --abort`), then run `adapters pull`.\n"
    )
    assert git(mate, "rev-parse", "-q", "--verify", "MERGE_HEAD")


def test_a_detached_head_is_refused_with_one_line_and_nothing_written(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    root = registry.root
    registry.add("support", make_adapter(1))
    registry.add("support", make_adapter(2))
    registry.promote("support@v1.0.0", "prod")
    registry.promote("support@v1.1.0", "prod")
    assert cli("push", cwd=root).exit_code == 0
    git(root, "checkout", "-q", "--detach")
    head, tags, remote = git(root, "rev-parse", "HEAD"), _tags(root), _tags(tmp_path / "origin.git")
    for args in (
        ("add", "support", str(make_adapter(3))),
        ("promote", "support@v1.0.0", "--stage", "staging"),
        ("rollback", "support", "--stage", "prod"),
        ("pull",),
        ("push",),
    ):
        result = cli(*args, cwd=root)
        assert result.exit_code == 5, args
        assert result.stderr == (
            "Error: HEAD is detached, and the registry commits and pulls on a branch: check out one first "
            "(`git switch -` returns to the last); nothing was changed.\n"
        ), args
    assert (git(root, "rev-parse", "HEAD"), _tags(root), _tags(tmp_path / "origin.git")) == (head, tags, remote)
    assert sha_tree(root / "adapters" / "support") == sha_tree(make_adapter(2))
    assert not git(root, "status", "--porcelain")


def _ssh_signing(tmp_path: Path) -> dict[str, str]:
    """Settings that sign with a fresh SSH key, and let `git verify-*` check it."""
    key = tmp_path / "signing-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    allowed = tmp_path / "allowed-signers"
    allowed.write_text(f"{os.environ['GIT_COMMITTER_EMAIL']} {key.with_suffix('.pub').read_text()}")
    return {
        "gpg__format": "ssh",
        "user__signingKey": str(key.with_suffix(".pub")),
        "gpg__ssh__allowedSignersFile": str(allowed),
    }


def test_commits_and_tags_are_signed_when_the_user_asks(user_config, make_adapter, tmp_path: Path, cli) -> None:
    if subprocess.run(["which", "ssh-keygen"], capture_output=True).returncode != 0:
        pytest.skip("ssh-keygen is not installed")
    user_config(commit__gpgSign="true", tag__gpgSign="true", **_ssh_signing(tmp_path))
    registry = _registry(tmp_path)
    root = registry.root
    assert cli("add", "support", str(make_adapter(1)), cwd=root).exit_code == 0
    assert cli("promote", "support@v1.0.0", "--stage", "prod", cwd=root).exit_code == 0
    git(root, "verify-commit", "HEAD")
    for tag in ("support@v1.0.0", "support#prod#1"):
        git(root, "verify-tag", tag)
    # The signature is not part of what the registry reads back: the action and the message are intact.
    log = json.loads(cli("log", "support", "--json", cwd=root).output)
    assert log["stage_history"][0]["action"] == "promote"
    assert cli("push", cwd=root).exit_code == 0
    mate = tmp_path / "mate"
    assert cli("clone", str(tmp_path / "origin.git"), str(mate), cwd=tmp_path).exit_code == 0
    assert json.loads(cli("list", "--json", cwd=mate).output)[0]["stages"] == {"prod": "v1.0.0"}


def test_signing_that_cannot_work_fails_add_with_one_line_and_changes_nothing(
    registry: Registry, user_config, make_adapter, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = registry.root
    registry.add("support", make_adapter(1))
    head, tags = git(root, "rev-parse", "HEAD"), _tags(root)
    home = tmp_path / "gnupg"  # an empty keyring: gpg has no key to sign with
    home.mkdir(mode=0o700)
    monkeypatch.setenv("GNUPGHOME", str(home))
    user_config(commit__gpgSign="true")
    added = cli("add", "support", str(make_adapter(2)), cwd=root)
    assert added.exit_code == 5
    assert added.stderr == (
        "Error: git could not sign the commit (commit.gpgSign is set: error: gpg failed to sign the data); fix your "
        "signing key, or turn signing off for this repository with `git config commit.gpgSign false`.\n"
    )
    assert (git(root, "rev-parse", "HEAD"), _tags(root)) == (head, tags)
    assert sha_tree(root / "adapters" / "support") == sha_tree(make_adapter(1))
    git(root, "config", "commit.gpgSign", "false")  # the advice works
    assert cli("add", "support", str(make_adapter(2)), cwd=root).exit_code == 0


def test_another_default_branch_and_crlf_checkouts_work_end_to_end(
    user_config, make_adapter, tmp_path: Path, cli
) -> None:
    user_config(init__defaultBranch="trunk", core__autocrlf="true")
    (tmp_path / "registry").mkdir()
    git(tmp_path / "registry", "init", "-q")  # an existing repository on the user's default branch
    registry = _registry(tmp_path)
    root = registry.root
    assert git(root, "symbolic-ref", "--short", "HEAD").strip() == "trunk"
    assert cli("add", "support", str(make_adapter(1)), cwd=root).exit_code == 0
    assert cli("promote", "support@v1.0.0", "--stage", "prod", cwd=root).exit_code == 0
    assert cli("push", cwd=root).exit_code == 0
    mate = tmp_path / "mate"
    assert cli("clone", str(tmp_path / "origin.git"), str(mate), cwd=tmp_path).exit_code == 0
    assert b"\r\n" in (mate / "adapters" / "support.dvc").read_bytes()  # checked out with CRLF line ends
    assert cli("add", "support", str(make_adapter(2)), cwd=mate).exit_code == 0
    assert cli("push", cwd=mate).exit_code == 0
    pulled = cli("pull", cwd=root)
    assert pulled.exit_code == 0, pulled.output
    for where in (root, mate):
        assert cli("status", cwd=where).output == "In sync with origin.\n"
        assert sha_tree(where / "adapters" / "support") == sha_tree(make_adapter(2))
    assert_checks_out(cli, mate, "support#prod", make_adapter(1), tmp_path / "prod")


def test_a_shallow_clone_pulls_registers_and_pushes(registry: Registry, make_adapter, tmp_path: Path, cli) -> None:
    for seed in (1, 2, 3):
        registry.add("support", make_adapter(seed))
    registry.promote("support@v1.0.0", "prod")
    assert cli("push", cwd=registry.root).exit_code == 0
    mate = tmp_path / "mate"
    git(tmp_path, "clone", "-q", "--depth", "1", f"file://{tmp_path / 'origin.git'}", str(mate))
    pulled = cli("pull", cwd=mate)
    assert pulled.exit_code == 0, pulled.output
    assert_checks_out(cli, mate, "support#prod", make_adapter(1), tmp_path / "prod")
    assert cli("add", "support", str(make_adapter(4)), cwd=mate).exit_code == 0
    assert cli("promote", "support@v1.3.0", "--stage", "prod", cwd=mate).exit_code == 0
    assert cli("push", cwd=mate).exit_code == 0
    assert cli("pull", cwd=registry.root).exit_code == 0
    assert_checks_out(cli, registry.root, "support#prod", make_adapter(4), tmp_path / "new-prod")
