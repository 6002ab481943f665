"""A remote someone else controls: nothing it sends is trusted as a path, a link or a place on disk.

Each attack is built as an attacker would: objects with correct MD5s written straight into the DVC remote and
commits pushed with plain git, never through `adapters`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers import git, sha_tree

from adapterctl.registry.repo import Registry


def _store(dvc: Path, data: bytes, suffix: str = "") -> str:
    """Put DATA into the object store at DVC (files/md5/ab/cdef...) under its MD5; returns the object name."""
    md5 = hashlib.md5(data).hexdigest() + suffix
    path = dvc / "files" / "md5" / md5[:2] / md5[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return md5


def _craft(registry: Registry, stores: list[Path], name: str, files: dict[str, bytes], version: str) -> str:
    """Commit and tag NAME@VERSION whose folder listing names FILES as given, objects written into STORES."""
    entries = [{"md5": hashlib.md5(data).hexdigest(), "relpath": relpath} for relpath, data in files.items()]
    listing = json.dumps(sorted(entries, key=lambda e: e["relpath"])).encode()
    for dvc in stores:
        for data in files.values():
            _store(dvc, data)
        folder = _store(dvc, listing, ".dir")
    pointer = registry.root / "adapters" / f"{name}.dvc"
    pointer.write_text(f"outs:\n- md5: {folder}\n  size: 10\n  nfiles: {len(files)}\n  hash: md5\n  path: {name}\n")
    git(registry.root, "add", str(pointer))
    git(registry.root, "commit", "-q", "-m", f"Register {name}@{version}")
    git(registry.root, "tag", "-a", f"{name}@{version}", "-m", f"Register {name}@{version}")
    return folder


def _evil_remote(registry: Registry, make_adapter, tmp_path: Path, cli, files: dict[str, bytes]) -> Path:
    """support@v1.0.0 pushed honestly, then support@v1.1.0 whose listing names FILES, pushed with plain git."""
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    origin = tmp_path / "origin.git"
    _craft(registry, [origin / "dvc"], "support", files, "v1.1.0")
    git(registry.root, "push", "-q", "origin", "HEAD", "--tags")
    return origin


def _clone_with_link(registry: Registry, relpath: str, target: Path, tmp_path: Path, cli) -> tuple[object, Path]:
    """Commit RELPATH as a link to TARGET (moving what was there aside), push it with plain git, clone as a victim."""
    link = registry.root / relpath
    link.rename(tmp_path / f"moved-{link.name}")
    link.symlink_to(target)
    git(registry.root, "add", "-f", relpath)
    git(registry.root, "commit", "-qm", f"link {relpath}")
    git(registry.root, "push", "-q", "origin", "HEAD")
    victim = tmp_path / "victim"
    return cli("clone", str(tmp_path / "origin.git"), str(victim), cwd=tmp_path), victim


def _escapes(tmp_path: Path) -> dict[str, bytes]:
    """A folder listing whose names climb out of the adapter folder and name an absolute path."""
    return {
        "adapter_config.json": b"{}",
        "../../../climbed.txt": b"written by the remote",
        str(tmp_path / "absolute.txt"): b"written by the remote",
    }


def test_clone_of_a_listing_that_climbs_out_writes_nothing_and_leaves_nothing(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    origin = _evil_remote(registry, make_adapter, tmp_path, cli, _escapes(tmp_path))
    victim = tmp_path / "victim" / "clone"
    victim.parent.mkdir()
    result = cli("clone", str(origin), str(victim), cwd=victim.parent)
    assert result.exit_code == 8
    assert result.stderr.startswith("Error: support@v1.1.0: object ")
    assert "names a file '../../../climbed.txt', which would be written outside its adapter folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "climbed.txt").exists() and not (tmp_path / "absolute.txt").exists()
    assert not any(tmp_path.rglob("climbed.txt")) and not victim.exists()  # a refused clone leaves nothing


def test_pull_and_checkout_refuse_an_absolute_name_and_change_nothing(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    mate = tmp_path / "mate"
    assert cli("clone", str(tmp_path / "origin.git"), str(mate), cwd=tmp_path).exit_code == 0
    beside = tmp_path / "absolute.txt"
    beside.write_text("mine")
    folder = _craft(registry, [tmp_path / "origin.git" / "dvc"], "support", {str(beside): b"theirs"}, "v1.1.0")
    git(registry.root, "push", "-q", "origin", "HEAD", "--tags")

    head = git(mate, "rev-parse", "HEAD")
    pulled = cli("pull", cwd=mate)
    assert pulled.exit_code == 8, pulled.output
    assert f"names a file '{beside}', which would be written outside its adapter folder" in pulled.stderr
    assert beside.read_text() == "mine" and git(mate, "rev-parse", "HEAD") == head
    assert sha_tree(mate / "adapters" / "support") == sha_tree(make_adapter(1))
    # The listing is not kept in the cache: a later look asks the remote again.
    assert not (mate / ".dvc" / "cache" / "files" / "md5" / folder[:2] / folder[2:]).exists()

    # The attacker's own clone holds the crafted objects locally: checkout -o refuses them too.
    _craft(registry, [registry.root / ".dvc" / "cache"], "support", {"../outside.txt": b"theirs"}, "v1.2.0")
    out = tmp_path / "out" / "files"
    checked = cli("checkout", "support@v1.2.0", "-o", str(out), cwd=registry.root)
    assert checked.exit_code == 8
    assert "names a file '../outside.txt'" in checked.stderr
    assert not (tmp_path / "out" / "outside.txt").exists() and not out.exists()


def test_a_hash_that_is_a_path_is_refused(registry: Registry, make_adapter, tmp_path: Path, cli) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    registry.add("support", make_adapter(1))
    cache = registry.root / ".dvc" / "cache"
    listing = json.dumps([{"md5": "../../../../secret.txt", "relpath": "adapter_config.json"}]).encode()
    folder = _store(cache, listing, ".dir")
    (registry.root / "adapters" / "support.dvc").write_text(f"outs:\n- md5: {folder}\n  path: support\n")
    git(registry.root, "commit", "-qam", "crafted")
    git(registry.root, "tag", "-a", "support@v1.1.0", "-m", "crafted")
    result = cli("checkout", "support@v1.1.0", "-o", str(tmp_path / "out"), cwd=registry.root)
    assert result.exit_code == 8
    assert "gives 'adapter_config.json' the hash '../../../../secret.txt', which is not an MD5" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_server_refuses_to_fetch_a_listing_that_climbs_out(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    from adapterctl.serve.catalog.versions import Catalog
    from adapterctl.serve.errors import AdapterRejected

    registry.add("support", make_adapter(1))
    _craft(registry, [registry.root / ".dvc" / "cache"], "support", _escapes(tmp_path), "v1.1.0")
    catalog = Catalog(
        registry, tmp_path / "server-cache", base_id="tiny", fingerprint="sha256:" + "0" * 64, max_rank=64
    )
    with pytest.raises(AdapterRejected, match="which would be written outside its adapter folder"):
        catalog.materialize(registry.state().resolve("support@v1.1.0"))
    assert not (tmp_path / "climbed.txt").exists() and not (tmp_path / "absolute.txt").exists()


def test_a_committed_link_in_adapters_is_never_followed(registry: Registry, make_adapter, tmp_path: Path, cli) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "private.txt").write_text("keep")
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    # The attacker commits adapters/support as a link (DVC's .gitignore entry does not stop `git add -f`).
    result, victim = _clone_with_link(registry, "adapters/support", elsewhere, tmp_path, cli)
    assert result.exit_code == 5
    assert result.stderr.strip() == (
        "Error: adapters/support is a symbolic link; the registry never follows links out of the repository: "
        "remove it (`git rm adapters/support`) and run the command again."
    )
    assert not victim.exists() and sorted(p.name for p in elsewhere.iterdir()) == ["private.txt"]
    # In the attacker's own clone, `status` refuses to read through it as well.
    status = cli("status", cwd=registry.root)
    assert status.exit_code == 5 and "adapters/support is a symbolic link" in status.stderr


def test_a_link_inside_an_adapter_folder_is_a_change_never_read(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry.add("support", make_adapter(1))
    weights = registry.root / "adapters" / "support" / "adapter_model.safetensors"
    outside = tmp_path / "outside.bin"
    outside.write_bytes(weights.read_bytes())  # the same bytes: only a read through the link would match
    weights.unlink()
    weights.symlink_to(outside)
    status = json.loads(cli("status", "--json", cwd=registry.root).output)
    assert status["modified"] == ["adapters/support/adapter_model.safetensors"]


def test_a_committed_cache_outside_the_repository_is_refused_unless_set_locally(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    elsewhere = tmp_path / "elsewhere-cache"
    with (registry.root / ".dvc" / "config").open("a") as config:
        config.write(f"[cache]\n    dir = {elsewhere}\n")
    git(registry.root, "commit", "-qam", "move the cache")
    git(registry.root, "push", "-q", "origin", "HEAD")

    victim = tmp_path / "victim"
    result = cli("clone", str(tmp_path / "origin.git"), str(victim), cwd=tmp_path)
    assert result.exit_code == 5
    assert result.stderr.strip() == (
        f"Error: The committed .dvc/config puts the DVC cache at {elsewhere}, outside this repository; if you "
        f"trust it, run `dvc cache dir --local {elsewhere}` here, else remove it from .dvc/config."
    )
    assert not victim.exists() and not elsewhere.exists()

    # Trusted explicitly on this machine, it is used.
    mate = tmp_path / "mate"
    git(tmp_path, "clone", "-q", str(tmp_path / "origin.git"), str(mate))
    (mate / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {elsewhere}\n")
    pulled = cli("pull", cwd=mate)
    assert pulled.exit_code == 0, pulled.output
    assert sha_tree(mate / "adapters" / "support") == sha_tree(make_adapter(1))
    assert any(p.is_file() for p in elsewhere.rglob("*"))


def test_a_committed_link_in_place_of_the_dvc_cache_is_refused(
    registry: Registry, make_adapter, tmp_path: Path, cli
) -> None:
    registry.add("support", make_adapter(1))
    assert cli("push", cwd=registry.root).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result, victim = _clone_with_link(registry, ".dvc/cache", elsewhere, tmp_path, cli)
    assert result.exit_code == 5
    assert result.stderr.startswith("Error: .dvc/cache is a symbolic link; the registry never follows links out")
    assert not victim.exists() and not any(elsewhere.iterdir())
