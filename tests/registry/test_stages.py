"""Stage changes under kills and hostile messages: a reader always sees one holder; history is never read from prose."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import killed_at

from adapterctl.registry.repo import Registry


def _killed_at(root: Path, nth: int, when: str, *args: str) -> subprocess.CompletedProcess:
    """Run `adapters ARGS` in ROOT, SIGKILLed at the NTH git call (every step a command takes goes through one)."""
    return killed_at(root, "adapterctl.registry.git:Git.run", nth, when, *args)


def _holder(root: Path, ref: str) -> str:
    """What a fresh reader (the server, `show`) resolves REF to."""
    return Registry(root).state().resolve(ref).ref


@pytest.mark.parametrize(
    ("command", "before", "after"),
    [
        (("promote", "support@v1.1.0", "--stage", "prod"), "support@v1.0.0", "support@v1.1.0"),
        (("rollback", "support", "--stage", "prod"), "support@v1.1.0", "support@v1.0.0"),
    ],
)
def test_a_stage_change_killed_at_any_step_leaves_the_old_holder_or_the_new_one(
    registry: Registry, make_adapter, tmp_path: Path, cli, command: tuple[str, ...], before: str, after: str
) -> None:
    registry.add("support", make_adapter(1))
    registry.add("support", make_adapter(2))
    registry.promote("support@v1.0.0", "prod")
    if command[0] == "rollback":
        registry.promote("support@v1.1.0", "prod")
    kills = 0
    for when in ("before", "after"):
        for nth in range(1, 50):
            copy = tmp_path / f"kill-{when}-{nth}"
            shutil.copytree(registry.root, copy, symlinks=True)
            child = _killed_at(copy, nth, when, *command)
            if child.returncode == 0:
                break  # past the last git call: the command ran to the end
            assert child.returncode == -signal.SIGKILL, child.stderr  # the kill landed at this step
            kills += 1
            seen = _holder(copy, "support#prod")
            assert seen in (before, after), (when, nth)
            assert _holder(copy, "support") == seen  # a bare name, as the server resolves it
            # The next command finds a consistent registry and completes the change.
            again = cli(*command, cwd=copy) if seen == before else None
            assert again is None or again.exit_code == 0, again.output
            assert _holder(copy, "support#prod") == after, (when, nth)
            shutil.rmtree(copy)
    assert kills >= 10  # every git call of the command was a kill point, before and after it


def test_promote_and_rollback_write_both_tags_in_one_step_that_gto_reads(registry: Registry, make_adapter) -> None:
    from gto.api import show

    registry.add("support", make_adapter(1))
    registry.add("support", make_adapter(2))
    registry.promote("support@v1.0.0", "prod")
    registry.promote("support@v1.1.0", "prod")
    tags = subprocess.run(["git", "tag"], cwd=registry.root, capture_output=True, text=True).stdout.split()
    assert sorted(t for t in tags if "#" in t) == ["support#prod!#2", "support#prod#1", "support#prod#3"]
    row = show(str(registry.root), table=True)[0][0]
    assert row["#prod"] == "v1.1.0"


def test_a_promote_unassigns_every_holder_gto_shows_not_only_the_newest(registry: Registry, make_adapter) -> None:
    from gto.api import show

    for seed in (1, 2, 3):
        registry.add("support", make_adapter(seed))
    registry.promote("support@v1.0.0", "prod")
    # An assignment written without unassigning the holder (by hand, or by an older registry after a race).
    v2 = registry.state().resolve("support@v1.1.0")
    env = {**os.environ, "GIT_COMMITTER_DATE": f"{v2.date + 10} +0000"}
    subprocess.run(["git", "tag", "-a", "support#prod#2", v2.commit, "-m", "x"], cwd=registry.root, check=True, env=env)

    def holders() -> list[str]:
        versions = show(str(registry.root), "support", versions_per_stage=-1)
        return sorted(v["version"] for v in versions for s in v["stages"] if s["stage"] == "prod")

    assert holders() == ["v1.0.0", "v1.1.0"]
    registry.promote("support@v1.2.0", "prod")
    assert holders() == ["v1.2.0"]
    assert [v.ref for v in registry.state().adapter("support").holders("prod")] == ["support@v1.2.0"]


def test_a_message_that_looks_like_a_rollback_is_recorded_as_a_promote(registry: Registry, make_adapter, cli) -> None:
    root = registry.root
    for seed in (1, 2, 3):
        registry.add("support", make_adapter(seed))
    assert cli("promote", "support@v1.0.0", "--stage", "prod", cwd=root).exit_code == 0
    assert cli("promote", "support@v1.1.0", "--stage", "prod", cwd=root).exit_code == 0
    forged = cli("promote", "support@v1.2.0", "--stage", "prod", "-m", "Roll back support#prod from v1.1.0", cwd=root)
    assert forged.exit_code == 0
    events = json.loads(cli("log", "support", "--json", cwd=root).output)["stage_history"]
    assert (events[0]["action"], events[0]["message"]) == ("promote", "Roll back support#prod from v1.1.0")
    back = cli("rollback", "support", "--stage", "prod", cwd=root)
    assert back.output == "support#prod -> v1.1.0 (rolled back from v1.2.0).\n"
    assert cli("rollback", "support", "--stage", "prod", cwd=root).output.startswith("support#prod -> v1.0.0")


@pytest.mark.parametrize(
    "message", ["two\nlines", "Roll back\n\nAdapters-Action: rollback", "bell\x07", "tab\there", "  "]
)
def test_a_message_must_be_one_printable_line_and_a_refused_one_changes_nothing(
    registry: Registry, make_adapter, cli, message: str
) -> None:
    root = registry.root
    registry.add("support", make_adapter(1))
    tags = subprocess.run(["git", "tag"], cwd=root, capture_output=True, text=True).stdout
    promoted = cli("promote", "support@v1.0.0", "--stage", "prod", "-m", message, cwd=root)
    assert promoted.exit_code == 2
    assert promoted.stderr == (
        "Error: A message must be one non-empty line of printable text (no newlines or control characters).\n"
    )
    added = cli("add", "support", str(make_adapter(2)), "-m", message, cwd=root)
    assert added.exit_code == 2
    assert subprocess.run(["git", "tag"], cwd=root, capture_output=True, text=True).stdout == tags
