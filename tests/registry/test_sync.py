"""Push, pull and clone against a real bare git remote with its DVC storage: exact bytes, races, corruption."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

from helpers import adapters_cli, assert_checks_out, git, killed_at, sha_tree, two_clones

from adapterctl.registry.push import push
from adapterctl.registry.git import Git
from adapterctl.registry.repo import Registry


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _remote_tags(origin: Path) -> list[str]:
    return sorted(git(origin, "tag", "--list").split())


def test_push_then_clone_gives_byte_exact_versions(registry: Registry, make_adapter, tmp_path: Path, cli) -> None:
    registry.add("support", make_adapter(1))
    registry.add("support", make_adapter(2))
    registry.promote("support@v1.0.0", "prod")
    pushed = cli("push", cwd=registry.root)
    assert pushed.exit_code == 0, pushed.output
    assert "support@v1.0.0" in pushed.output and "support#prod#1" in pushed.output
    origin = tmp_path / "origin.git"
    assert _remote_tags(origin) == ["support#prod#1", "support@v1.0.0", "support@v1.1.0"]
    cloned = cli("clone", str(origin), str(tmp_path / "teammate"), cwd=tmp_path)
    assert cloned.exit_code == 0, cloned.output
    mate = tmp_path / "teammate"
    assert json.loads(cli("list", "--json", cwd=mate).output)[0]["stages"] == {"prod": "v1.0.0"}
    assert sha_tree(mate / "adapters" / "support") == sha_tree(
        make_adapter(2)
    )  # the workspace holds the branch's version
    assert cli("checkout", "support#prod", "-o", str(tmp_path / "prod"), cwd=mate).exit_code == 0
    assert sha_tree(tmp_path / "prod") == sha_tree(make_adapter(1))
    assert cli("status", "--json", cwd=mate).exit_code == 0
    assert json.loads(cli("status", "--json", cwd=mate).output) == {
        "remote": "origin",
        "remote_state": "known",
        "unpushed_tags": [],
        "missing_locally": [],
        "missing_on_remote": [],
        "remote_only_tags": [],
        "modified": [],
        "interrupted_pull": False,
    }


def test_pushing_an_unchanged_registry_moves_no_bytes(registry: Registry, make_adapter, tmp_path: Path, cli) -> None:
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    origin = tmp_path / "origin.git"
    before = _tree_bytes(origin)
    again = cli("push", cwd=registry.root)
    assert again.exit_code == 0 and again.output == "Everything is already on origin.\n"
    assert _tree_bytes(origin) == before
    registry.add("support", make_adapter(2))
    status = json.loads(cli("status", "--json", cwd=registry.root).output)
    assert status["unpushed_tags"] == ["support@v1.1.0"]
    before = _tree_bytes(origin / "dvc")
    assert cli("push", cwd=registry.root).exit_code == 0
    first = {hashlib.md5(p.read_bytes()).hexdigest() for p in make_adapter(1).iterdir()}
    new_bytes = sum(
        p.stat().st_size for p in make_adapter(2).iterdir() if hashlib.md5(p.read_bytes()).hexdigest() not in first
    )
    grown = _tree_bytes(origin / "dvc") - before
    assert new_bytes <= grown <= new_bytes + 1024  # only the new version's new files, plus its small file list


def test_push_of_selected_names_still_uploads_everything_the_branch_points_at(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry.add("support", make_adapter(1))
    registry.add("contacts", make_adapter(2))
    assert cli("push", "contacts", cwd=registry.root).exit_code == 0
    assert _remote_tags(tmp_path / "origin.git") == ["contacts@v1.0.0"]
    # The branch went too, and it names support's files: they must be on the remote already.
    cloned = cli("clone", str(tmp_path / "origin.git"), str(tmp_path / "mate"), cwd=tmp_path)
    assert cloned.exit_code == 0, cloned.output
    assert sha_tree(tmp_path / "mate" / "adapters" / "support") == sha_tree(make_adapter(1))


def test_a_published_version_cannot_be_changed(registry: Registry, make_adapter, tmp_path: Path, cli) -> None:
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    # Rewrite history locally: the same version name now points at other files.
    git(registry.root, "tag", "-d", "support@v1.0.0")
    git(registry.root, "commit", "--allow-empty", "-qm", "other")
    git(registry.root, "tag", "-a", "support@v1.0.0", "-m", "forged")
    result = cli("push", cwd=registry.root)
    assert result.exit_code == 7
    assert "support@v1.0.0 on origin points at another commit; versions are immutable" in result.stderr


def test_rollback_on_one_clone_reaches_another_with_the_old_bytes(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry.add("support", make_adapter(1))
    registry.promote("support@v1.0.0", "prod")
    registry.add("support", make_adapter(2))
    registry.promote("support@v1.1.0", "prod")
    assert cli("push", cwd=registry.root).exit_code == 0
    origin = str(tmp_path / "origin.git")
    assert cli("clone", origin, str(tmp_path / "server"), cwd=tmp_path).exit_code == 0
    server = tmp_path / "server"
    assert cli("checkout", "support#prod", "-o", str(tmp_path / "before"), cwd=server).exit_code == 0
    assert sha_tree(tmp_path / "before") == sha_tree(make_adapter(2))

    assert cli("rollback", "support", "--stage", "prod", cwd=registry.root).exit_code == 0
    assert cli("push", cwd=registry.root).exit_code == 0

    pulled = cli("pull", "support#prod", cwd=server)
    assert pulled.exit_code == 0, pulled.output
    assert "support@v1.0.0" in pulled.output
    assert cli("checkout", "support#prod", "-o", str(tmp_path / "after"), cwd=server).exit_code == 0
    assert sha_tree(tmp_path / "after") == sha_tree(make_adapter(1))


def test_pull_on_a_fresh_clone_fetches_only_what_was_asked(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    for seed in (1, 2, 3):
        registry.add("support", make_adapter(seed))
    registry.promote("support@v1.0.0", "prod")
    assert cli("push", cwd=registry.root).exit_code == 0
    mate = tmp_path / "mate"
    git(tmp_path, "clone", "-q", str(tmp_path / "origin.git"), str(mate))
    result = cli("pull", "support#prod", cwd=mate)
    assert result.exit_code == 0, result.output
    missing = json.loads(cli("status", "--json", cwd=mate).output)["missing_locally"]
    assert missing == ["support@v1.1.0"]  # prod (asked) and v1.2.0 (the branch's workspace copy) are here


def test_a_corrupt_object_on_the_remote_fails_pull_and_changes_nothing(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    mate = two_clones(registry, make_adapter, tmp_path, cli)
    weights = hashlib.md5((make_adapter(2) / "adapter_model.safetensors").read_bytes()).hexdigest()
    stored = tmp_path / "origin.git" / "dvc" / "files" / "md5" / weights[:2] / weights[2:]
    stored.chmod(0o644)
    stored.write_bytes(b"\0" + stored.read_bytes()[1:])  # one flipped byte, same size

    head = git(mate, "rev-parse", "HEAD")
    result = cli("pull", cwd=mate)
    assert result.exit_code == 8
    assert result.stderr.strip() == (
        "Error: support@v1.1.0: its files are missing or corrupt on the DVC remote; in a clone that has them "
        "(`adapters verify` there says so), `adapters push --verify` uploads them again; nothing was changed."
    )
    assert git(mate, "rev-parse", "HEAD") == head
    assert sha_tree(mate / "adapters" / "support") == sha_tree(make_adapter(1))
    assert not any(p.name == weights[2:] for p in (mate / ".dvc" / "cache").rglob("*"))  # the bad copy was not kept
    # The advice works: a clone that has the good copy says what the remote lacks, and a push uploads it again.
    verified = cli("verify", "--remote", cwd=registry.root)
    assert verified.exit_code == 8
    assert verified.output == (
        "support@v1.1.0: adapter_model.safetensors missing on origin; fix: adapters push --verify\n"
        "2 versions checked here and on the remote: 1 problem.\n"
    )
    repaired = cli("push", "--verify", cwd=registry.root)
    assert repaired.output == "Pushed to origin: 1 files, 0 tags.\n  repaired support@v1.1.0\n"
    assert cli("pull", cwd=mate).exit_code == 0
    assert sha_tree(mate / "adapters" / "support") == sha_tree(make_adapter(2))


def test_a_flipped_byte_on_the_remote_is_found_by_verify_and_repaired_by_push_verify(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    weights = hashlib.md5((make_adapter(1) / "adapter_model.safetensors").read_bytes()).hexdigest()
    stored = tmp_path / "origin.git" / "dvc" / "files" / "md5" / weights[:2] / weights[2:]
    stored.chmod(0o644)
    stored.write_bytes(b"\0" + stored.read_bytes()[1:])  # one flipped byte, same size
    stored.chmod(0o444)  # as DVC left it: rot does not change a file's mode
    assert cli("status", cwd=registry.root).output == "In sync with origin.\n"  # existence checks cannot see it
    assert cli("verify", cwd=registry.root).output == "1 versions checked here: no problems.\n"
    verified = cli("verify", "--remote", "--json", cwd=registry.root)
    assert verified.exit_code == 8
    assert json.loads(verified.output) == {
        "checked": 1,
        "problems": [
            {
                "ref": "support@v1.0.0",
                "where": "origin",
                "file": "adapter_model.safetensors",
                "problem": "corrupt",
                "fix": "adapters push --verify",
            }
        ],
    }
    assert cli("push", cwd=registry.root).output == "Everything is already on origin.\n"
    repaired = cli("push", "--verify", cwd=registry.root)
    assert repaired.output == "Pushed to origin: 1 files, 0 tags.\n  repaired support@v1.0.0\n"
    assert hashlib.md5(stored.read_bytes()).hexdigest() == weights
    assert cli("verify", "--remote", cwd=registry.root).output == (
        "1 versions checked here and on the remote: no problems.\n"
    )


def test_objects_missing_on_the_remote_fail_pull_with_a_clear_error(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    for path in (tmp_path / "origin.git" / "dvc").rglob("*"):
        if path.is_file():
            path.unlink()
    result = cli("clone", str(tmp_path / "origin.git"), str(tmp_path / "mate"), cwd=tmp_path)
    assert result.exit_code == 8
    assert "support@v1.0.0: its files are missing or corrupt on the DVC remote" in result.stderr
    status = json.loads(cli("status", "--json", cwd=registry.root).output)
    assert status["missing_on_remote"] == ["support@v1.0.0"]
    # The version is published already; push still uploads what the remote lost.
    pushed = cli("push", cwd=registry.root)
    assert pushed.output == "Pushed to origin: 5 files, 0 tags.\n  repaired support@v1.0.0\n"  # 4 files + their list
    assert json.loads(cli("status", "--json", cwd=registry.root).output)["missing_on_remote"] == []
    assert cli("clone", str(tmp_path / "origin.git"), str(tmp_path / "mate2"), cwd=tmp_path).exit_code == 0


def test_two_concurrent_pushers_one_wins_the_other_pulls_and_no_version_is_lost(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    origin = str(tmp_path / "origin.git")
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    for who in (alice, bob):
        assert cli("clone", origin, str(who), cwd=tmp_path).exit_code == 0
    assert cli("add", "support", str(make_adapter(2)), cwd=alice).exit_code == 0  # support@v1.1.0
    assert cli("add", "contacts", str(make_adapter(3)), cwd=bob).exit_code == 0
    assert cli("add", "support", str(make_adapter(4)), "--version", "2.0.0", cwd=bob).exit_code == 0

    results: dict[str, subprocess.CompletedProcess] = {}
    start = threading.Barrier(2)

    def push(who: Path) -> None:
        start.wait()
        results[who.name] = adapters_cli("push", cwd=who)

    threads = [threading.Thread(target=push, args=(who,)) for who in (alice, bob)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = sorted(r.returncode for r in results.values())
    assert codes == [0, 7], {k: (r.returncode, r.stderr) for k, r in results.items()}
    loser = next(who for who in (alice, bob) if results[who.name].returncode == 7)
    assert results[loser.name].stderr.strip() == (
        "Error: origin has versions or commits this registry lacks; run `adapters pull`, then push again."
    )
    assert cli("pull", cwd=loser).exit_code == 0
    assert cli("push", cwd=loser).exit_code == 0
    assert _remote_tags(tmp_path / "origin.git") == [
        "contacts@v1.0.0", "support@v1.0.0", "support@v1.1.0", "support@v2.0.0",
    ]  # fmt: skip
    fresh = tmp_path / "fresh"
    assert cli("clone", origin, str(fresh), cwd=tmp_path).exit_code == 0
    for ref, seed in (("support@v1.1.0", 2), ("contacts@v1.0.0", 3), ("support@v2.0.0", 4)):
        assert_checks_out(cli, fresh, ref, make_adapter(seed), tmp_path / f"check-{seed}")
    assert sha_tree(fresh / "adapters" / "support") == sha_tree(make_adapter(4))
    assert sha_tree(fresh / "adapters" / "contacts") == sha_tree(make_adapter(3))


def test_the_same_version_registered_in_two_clones_is_renumbered_not_lost(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    origin = str(tmp_path / "origin.git")
    mate = tmp_path / "mate"
    assert cli("clone", origin, str(mate), cwd=tmp_path).exit_code == 0
    registry.add("support", make_adapter(2))  # support@v1.1.0 here...
    assert cli("add", "support", str(make_adapter(3)), cwd=mate).exit_code == 0  # ...and there
    assert cli("push", cwd=registry.root).exit_code == 0
    assert cli("push", cwd=mate).exit_code == 7
    pulled = cli("pull", cwd=mate)
    assert pulled.exit_code == 0, pulled.output
    assert "support@v1.1.0 was also registered on origin; yours is now support@v1.1.1." in pulled.output
    assert cli("push", cwd=mate).exit_code == 0
    assert_checks_out(cli, mate, "support@v1.1.1", make_adapter(3), tmp_path / "mine")
    assert_checks_out(cli, mate, "support@v1.1.0", make_adapter(2), tmp_path / "theirs")


def test_two_clones_promoting_at_once_end_with_one_prod_version_for_gto_too(
    registry: Registry, make_adapter, tmp_path: Path, cli, monkeypatch
) -> None:
    from gto.api import show

    for seed in (1, 2, 3):
        registry.add("support", make_adapter(seed))
    registry.promote("support@v1.0.0", "prod")
    assert cli("push", cwd=registry.root).exit_code == 0
    origin = str(tmp_path / "origin.git")
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    for who in (alice, bob):
        assert cli("clone", origin, str(who), cwd=tmp_path).exit_code == 0
    assert cli("promote", "support@v1.1.0", "--stage", "prod", cwd=alice).exit_code == 0
    assert cli("promote", "support@v1.2.0", "--stage", "prod", cwd=bob).exit_code == 0
    # Bob reads the remote before Alice's push lands: his own checks pass, and git refuses his stage tags.
    stale = Git(bob).remote_refs("origin")
    assert cli("push", cwd=alice).exit_code == 0
    with monkeypatch.context() as patched:
        patched.setattr(Git, "remote_refs", lambda self, remote: stale)
        lost = cli("push", cwd=bob)
    assert lost.exit_code == 7
    assert lost.stderr == (
        "Error: origin has versions or commits this registry lacks; run `adapters pull`, then push again.\n"
    )
    pulled = cli("pull", cwd=bob)
    assert pulled.exit_code == 0, pulled.output
    assert cli("push", cwd=bob).exit_code == 0
    # The newer assignment (Bob's, renumbered) holds prod, and Alice's holder is unassigned for GTO as well.
    assert _remote_tags(tmp_path / "origin.git") == [
        "support#prod!#2", "support#prod!#5", "support#prod#1", "support#prod#3", "support#prod#4",
        "support@v1.0.0", "support@v1.1.0", "support@v1.2.0",
    ]  # fmt: skip
    fresh = tmp_path / "fresh"
    git(tmp_path, "clone", "-q", origin, str(fresh))
    versions = show(str(fresh), "support", versions_per_stage=-1)
    assert [v["version"] for v in versions for s in v["stages"] if s["stage"] == "prod"] == ["v1.2.0"]
    for who in (alice, bob):
        assert cli("pull", cwd=who).exit_code == 0
        assert json.loads(cli("list", "--json", cwd=who).output)[0]["stages"] == {"prod": "v1.2.0"}


def test_a_deregistered_version_keeps_its_files_on_the_remote(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    """`gto deprecate NAME VERSION` hides a version (here prod's), but its tags still travel: so do its files."""
    registry.add("support", make_adapter(1))
    registry.promote("support@v1.0.0", "prod")
    registry.add("support", make_adapter(2))
    gto = Path(sys.executable).with_name("gto")
    subprocess.run([str(gto), "deprecate", "support", "v1.0.0"], cwd=registry.root, check=True, capture_output=True)
    assert cli("push", cwd=registry.root).exit_code == 0
    origin = tmp_path / "origin.git"
    assert "support@v1.0.0" in _remote_tags(origin)
    out = tmp_path / "got"
    dvc = Path(sys.executable).with_name("dvc")
    got = subprocess.run(
        [str(dvc), "get", str(origin), "adapters/support", "--rev", "support@v1.0.0", "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert got.returncode == 0, got.stderr
    assert sha_tree(out) == sha_tree(make_adapter(1))
    # verify --remote checks its files, and push --verify puts back what the remote lost.
    weights = hashlib.md5((make_adapter(1) / "adapter_model.safetensors").read_bytes()).hexdigest()
    (origin / "dvc" / "files" / "md5" / weights[:2] / weights[2:]).unlink()
    verified = cli("verify", "--remote", cwd=registry.root)
    assert verified.exit_code == 8
    assert "support@v1.0.0: adapter_model.safetensors missing on origin; fix: adapters push --verify\n" in (
        verified.output
    )
    repaired = cli("push", "--verify", cwd=registry.root)
    assert repaired.output == "Pushed to origin: 1 files, 0 tags.\n  repaired support@v1.0.0\n"
    assert cli("verify", "--remote", cwd=registry.root).exit_code == 0


def test_train_inside_a_registry_registers_the_new_version(
    registry: Registry, tiny_base: Path, json_data: Path, cli
) -> None:
    args = ["--data", str(json_data), "--base", str(tiny_base), "--max-steps", "2", "--seq-len", "64"]
    result = cli("train", "people", *args, "-m", "first run", cwd=registry.root)
    assert result.exit_code == 0, result.output
    assert f"Registered people@v1.0.0 in {registry.root}." in result.output
    again = cli("train", "people", *args, "--seed", "7", cwd=registry.root)  # the same command, the next version
    assert again.exit_code == 0, again.output
    assert "runs/people held people@v1.0.0, already registered; training the next version there." in again.output
    assert f"Registered people@v1.1.0 in {registry.root}." in again.output
    log = json.loads(cli("log", "people", "--json", cwd=registry.root).output)
    assert [v["ref"] for v in log["versions"]] == ["people@v1.1.0", "people@v1.0.0"]
    assert log["versions"][1]["message"] == "first run"
    assert log["versions"][0]["metrics"]["eval_loss_after"] is not None
    # A run that was never registered is never deleted: training refuses, as outside a registry.
    unregistered = cli("train", "people", *args, "--seed", "8", "--no-register", "-o", "runs/mine", cwd=registry.root)
    assert unregistered.exit_code == 0, unregistered.output
    before = sha_tree(registry.root / "runs" / "mine")
    refused = cli("train", "people", *args, "-o", "runs/mine", cwd=registry.root)
    assert refused.exit_code == 4 and "runs/mine already exists and is not empty" in refused.stderr
    assert sha_tree(registry.root / "runs" / "mine") == before


def test_dvc_artifacts_get_reads_the_same_repository(registry: Registry, make_adapter, tmp_path: Path) -> None:
    registry.add("support", make_adapter(1))
    registry.add("support", make_adapter(2))
    registry.promote("support@v1.0.0", "prod")
    push(registry, [])
    dvc = Path(sys.executable).with_name("dvc")
    origin = str(tmp_path / "origin.git")
    for args, expected in ((["--rev", "v1.1.0"], 2), (["--stage", "prod"], 1)):
        out = tmp_path / f"dvc-{expected}"
        proc = subprocess.run(
            [str(dvc), "artifacts", "get", origin, "support", *args, "-o", str(out)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert sha_tree(out) == sha_tree(make_adapter(expected))


def test_a_push_killed_at_any_moment_never_publishes_a_ref_without_its_files(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    """Kill `adapters push` at each of its fault points (before any upload, between the files and their folder
    lists, before the git push); after each, every version the remote lists has all its files there, and a
    final push completes."""
    for seed in range(1, 7):
        registry.add(f"a{seed % 3}", make_adapter(seed))
    origin = tmp_path / "origin.git"
    transfer = "adapterctl.registry.store:Store._transfer"
    points = [
        (transfer, 1, "before"),  # nothing uploaded yet
        (transfer, 2, "before"),  # every file uploaded, no folder list yet
        (transfer, 2, "after"),  # every object uploaded, the git push not started
    ]
    for point, nth, when in points:
        child = killed_at(registry.root, point, nth, when, "push")
        assert child.returncode == -signal.SIGKILL, (nth, when, child.stderr)  # the kill landed there
        assert _remote_tags(origin) == []  # refs go last
        status = json.loads(cli("status", "--json", cwd=registry.root).output)
        assert status["missing_on_remote"] == [], (nth, when)
    assert cli("push", cwd=registry.root).exit_code == 0
    mate = tmp_path / "mate"
    assert cli("clone", str(origin), str(mate), cwd=tmp_path).exit_code == 0
    for seed in range(1, 7):
        version = "v1.0.0" if seed <= 3 else "v1.1.0"
        assert_checks_out(cli, mate, f"a{seed % 3}@{version}", make_adapter(seed), tmp_path / f"out-{seed}")


def test_a_clone_of_a_mirrored_copy_says_where_its_files_come_from(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    origin, copy = tmp_path / "origin.git", tmp_path / "copy.git"
    git(tmp_path, "init", "-q", "--bare", str(copy))
    git(origin, "push", "-q", "--mirror", str(copy))  # git's refs only: the DVC storage stays beside the original
    result = cli("clone", str(copy), str(tmp_path / "mate"), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        f"Note: adapter files come from the DVC storage {origin.resolve() / 'dvc'} (committed in .dvc/config), not "
        f"from beside {copy}; to give this copy its own: adapters remote add origin {copy} --dvc PATH\n"
    )
    plain = cli("clone", str(origin), str(tmp_path / "plain"), cwd=tmp_path)
    assert plain.exit_code == 0 and plain.stderr == ""
