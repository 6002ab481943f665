"""The workspace like git keeps it: pull never silently drops local edits, status sees them, kills leave no mess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, git, killed_at, sha_tree, two_clones

from adapterctl.registry.repo import Registry


def test_pull_refuses_to_overwrite_local_edits_and_force_discards_them(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    mate = two_clones(registry, make_adapter, tmp_path, cli)
    card = mate / "adapters" / "support" / "README.md"
    card.chmod(0o644)
    card.write_text("my notes\n")
    status = cli("status", cwd=mate)
    assert "modified here (adapters pull --force discards): adapters/support/README.md\n" in status.output
    head = git(mate, "rev-parse", "HEAD")
    refused = cli("pull", cwd=mate)
    assert refused.exit_code == 7
    assert refused.stderr == (
        "Error: Your local changes to adapters/support/README.md would be overwritten by pull; copy them elsewhere "
        "(and `adapters add` them), or run `adapters pull --force` to discard them. Nothing was changed.\n"
    )
    assert card.read_text() == "my notes\n" and git(mate, "rev-parse", "HEAD") == head
    assert git(mate, "tag") == "support@v1.0.0\n"
    forced = cli("pull", "--force", cwd=mate)
    assert forced.exit_code == 0, forced.output
    assert sha_tree(mate / "adapters" / "support") == sha_tree(make_adapter(2))
    assert cli("status", cwd=mate).output == "In sync with origin.\n"


def test_a_version_left_by_a_branch_checkout_is_not_a_local_edit(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    mate = two_clones(registry, make_adapter, tmp_path, cli)  # mate holds support@v1.0.0; origin has v1.1.0
    git(mate, "checkout", "-q", "-b", "experiment")
    assert cli("add", "support", str(make_adapter(3)), cwd=mate).exit_code == 0  # the workspace: mate's v1.1.0
    git(mate, "checkout", "-q", "main")  # the pointer moves back; the folder, ignored by git, does not
    assert json.loads(cli("status", "--json", cwd=mate).output)["modified"] == []
    pulled = cli("pull", cwd=mate)
    assert pulled.exit_code == 0, pulled.output
    assert sha_tree(mate / "adapters" / "support") == sha_tree(make_adapter(2))


def test_a_pull_killed_after_moving_the_branch_is_reported_and_finished_by_the_next(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    mate = two_clones(registry, make_adapter, tmp_path, cli)
    child = killed_at(mate, "adapterctl.registry.store:Store.place", 1, "before", "pull")
    assert child.returncode == -signal.SIGKILL, child.stderr  # the branch moved, the files did not
    assert git(mate, "tag").split() == ["support@v1.0.0", "support@v1.1.0"]
    assert sha_tree(mate / "adapters" / "support") == sha_tree(make_adapter(1))
    status = cli("status", cwd=mate)
    assert status.output.startswith("A pull was interrupted: run `adapters pull` to finish it.\n")
    finished = cli("pull", cwd=mate)  # the old files are not edits: the pull finishes instead of refusing
    assert finished.exit_code == 0, finished.output
    assert sha_tree(mate / "adapters" / "support") == sha_tree(make_adapter(2))
    assert cli("status", cwd=mate).output == "In sync with origin.\n"


def test_status_works_offline_and_says_the_remote_is_unknown(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    registry.add("support", make_adapter(2))
    (tmp_path / "origin.git").rename(tmp_path / "elsewhere.git")  # the remote is out of reach
    status = cli("status", "--json", cwd=registry.root)
    assert status.exit_code == 0, status.output
    data = json.loads(status.stdout)
    assert data["remote_state"] == "unknown" and data["remote_error"].startswith("git ls-remote failed: ")
    assert data["unpushed_tags"] == [] and data["missing_locally"] == [] and data["modified"] == []
    text = cli("status", cwd=registry.root)
    assert text.exit_code == 0 and text.output.startswith("origin: unknown (git ls-remote failed: ")


def _on_a_terminal(*args: str, cwd: Path) -> str:
    """Run `adapters ARGS` with stderr on a pseudo-terminal, as a person at a shell; returns what it showed there."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    master, child_end = pty.openpty()
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a terminal has a size
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapterctl.cli", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=child_end,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    os.close(child_end)
    shown = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed its end
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    assert proc.wait(timeout=120) == 0
    reader.join(timeout=10)
    os.close(master)
    return shown.decode(errors="replace")


def test_transfers_show_progress_on_a_terminal_and_nothing_in_a_pipe(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    from helpers import adapters_cli

    registry.add("support", make_adapter(1))
    assert "Uploading adapter files" in _on_a_terminal("push", cwd=registry.root)
    origin = str(tmp_path / "origin.git")
    assert "Downloading adapter files" in _on_a_terminal("clone", origin, str(tmp_path / "a"), cwd=tmp_path)
    piped = adapters_cli("clone", origin, str(tmp_path / "b"), cwd=tmp_path)
    assert piped.returncode == 0 and piped.stderr == ""
    assert sha_tree(tmp_path / "a" / "adapters" / "support") == sha_tree(make_adapter(1))
