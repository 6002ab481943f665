"""Remotes: a git remote and its DVC storage, configured together; which one a command uses."""

from __future__ import annotations

from pathlib import Path

from adapterctl.core.errors import Conflict, NotFound, RegistryError
from adapterctl.registry import store
from adapterctl.registry.git import Git, init_bare
from adapterctl.registry.repo import Registry

# Remote tags are fetched here first, so a clash with a local tag is seen before anything changes.
REMOTE_TAGS = "refs/adapters/remote-tags"


def set_remote(
    registry: Registry, name: str, url: str, dvc_url: str | None, options: dict[str, str], create: bool = False
) -> str:
    """Add (or re-point) git remote NAME and its DVC remote; the first one becomes DVC's default.

    A folder URL must hold a git repository already, so a typo never becomes a new empty remote; CREATE
    makes an empty bare one there.
    """
    dvc_url = dvc_url or store.default_dvc_url(url)
    if not dvc_url:
        raise RegistryError(
            f"{url} is not a local folder; give its DVC storage with --dvc (for example s3://bucket/path)."
        )
    path = store.local_path(url)
    if path and create:
        if path.exists() and any(path.iterdir()):
            raise Conflict(f"{path} already exists and is not empty; drop --create to use the repository there.")
        init_bare(path, registry.git.branch())
    elif path and not _is_repository(path):
        raise NotFound(f"{url} is not a git repository; check the path, or pass --create to make an empty one there.")
    if name in registry.git.remotes():
        registry.git.run("remote", "set-url", name, url)
    else:
        registry.git.run("remote", "add", name, url)
    _, default = store.remotes(registry.root)
    store.configure_remote(registry.root, name, dvc_url, options, default=default in (None, name))
    registry.git.commit_paths(f"Add remote {name}", ".dvc/config")
    return dvc_url


def _is_repository(path: Path) -> bool:
    """True when PATH itself is a git repository (bare, or a work tree's top), not merely inside one."""
    if not path.is_dir():
        return False
    try:
        git_dir = Path(Git(path).run("rev-parse", "--absolute-git-dir").strip())
    except RegistryError:
        return False
    return git_dir.resolve() in (path.resolve(), (path / ".git").resolve())


def remove_remote(registry: Registry, name: str) -> None:
    """Forget remote NAME here: its git remote, its remote-tag cache and its DVC entry (committed)."""
    with registry.lock():
        if name not in registry.git.remotes() and name not in store.remotes(registry.root)[0]:
            raise NotFound(f"No remote named {name!r}; `adapters remote -v` lists them.")
        if name in registry.git.remotes():
            registry.git.run("remote", "remove", name)
        cached = registry.git.run("for-each-ref", "--format=%(refname)", f"{REMOTE_TAGS}/{name}").split()
        registry.git.run("update-ref", "--stdin", input="".join(f"delete {ref}\n" for ref in cached))
        store.remove_remote(registry.root, name)
        registry.git.commit_paths(f"Remove remote {name}", ".dvc/config")


def list_remotes(registry: Registry) -> list[dict[str, object]]:
    """Each remote: git URL, DVC URL, and whether it is the default."""
    dvc, default = store.remotes(registry.root)
    names = registry.git.remotes()
    rows = []
    for name in sorted(set(names) | set(dvc)):
        git_url = registry.git.run("remote", "get-url", name).strip() if name in names else None
        rows.append({"name": name, "git": git_url, "dvc": (dvc.get(name) or {}).get("url"), "default": name == default})
    return rows


def resolve_remote(registry: Registry, remote: str | None) -> str:
    """The remote to use: the one named, else DVC's default, else 'origin'."""
    if remote is None:
        _, remote = store.remotes(registry.root)
    remote = remote or "origin"
    if remote not in registry.git.remotes():
        raise NotFound(f"No remote named {remote!r}; add one with `adapters remote add {remote} URL`.")
    return remote


def storage_elsewhere(registry: Registry, url: str) -> str | None:
    """The DVC storage a clone of the local git remote URL uses, when it is not the one beside URL's git files.

    A copy made with `git push --mirror` carries the original's committed DVC remote, so its files still come from
    (and go to) the original's storage; a user should know.
    """
    beside = store.default_dvc_url(url)
    found, default = store.remotes(registry.root)
    used = (found.get(default or "") or {}).get("url")
    where = store.local_path(used) if used else None
    if beside is None or where is None:
        return None
    where = where if where.is_absolute() else registry.root / ".dvc" / where
    return None if where.resolve() == Path(beside).resolve() else str(used)
