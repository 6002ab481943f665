"""Verify: every adapter file hashed against its record, here and on the remote, each problem with its fix."""

from __future__ import annotations

from dataclasses import dataclass

from adapterctl.core.errors import NotFound, RemoteError
from adapterctl.registry import store
from adapterctl.registry.refs import AdapterVersion
from adapterctl.registry.remotes import resolve_remote
from adapterctl.registry.repo import Registry


@dataclass
class Problem:
    """One bad copy found by `adapters verify`: which version, where, which file, what is wrong, what fixes it."""

    ref: str
    where: str
    file: str
    problem: str
    fix: str


def verify(registry: Registry, remote: str | None, on_remote: bool) -> tuple[int, list[Problem]]:
    """Hash every object of every version here (and, ON_REMOTE, on the remote); returns (versions checked, problems).

    A corrupt local copy is removed, so the next pull fetches a sound one. A version this clone must hold (the
    branch's own, or one no remote has) is a problem when its files are gone; others never fetched here are not.
    On the remote, only published versions are checked.
    """
    with registry.lock():
        state = registry.state()
        versions = state.every_version
        remote = resolve_remote(registry, remote) if on_remote else remote
        published = set(registry.git.remote_refs(remote)) if on_remote else set()
        pointers = registry.pointers(versions)
        held = _held(registry, list(zip(versions, pointers, strict=True)), remote, published if on_remote else None)
        problems: list[Problem] = []
        with store.opened(registry.root) as objects:
            sound = set()
            for ref, md5 in pointers:
                if objects.missing_locally(md5) == [md5]:
                    if ref in held:  # its folder's file list is gone, so audit has nothing to go by
                        problems.append(Problem(ref, "here", "file list", "missing", held[ref]))
                    continue  # never fetched here: nothing to check
                bad = objects.audit(md5)
                objects.discard([oid for _, oid, problem in bad if problem == "corrupt"])
                problems += [Problem(ref, "here", f, what, f"adapters pull {ref}") for f, _, what in bad]
                if not bad:
                    sound.add(md5)
            for version, (ref, md5) in zip(versions, pointers, strict=True):
                if f"refs/tags/{version.tag}" not in published:
                    continue
                fix = "adapters push --verify" + ("" if md5 in sound else f", in a clone that has {ref}")
                problems += [
                    Problem(ref, remote, f, what, fix)
                    for f, _, what in objects.audit(md5, on_remote=True, remote=remote)
                ]
        return len(versions), problems


def _held(
    registry: Registry,
    versions: list[tuple[AdapterVersion, tuple[str, str]]],
    remote: str | None,
    published: set[str] | None,
) -> dict[str, str]:
    """{ref: fix} of the versions this clone must hold: the branch's own, and those no remote has (the only copy).

    PUBLISHED: the remote's refs when already read; else they are asked for, and an unreachable remote means only
    the branch's own are known to be needed.
    """
    if published is None:
        try:
            published = set(registry.git.remote_refs(resolve_remote(registry, remote)))
        except NotFound:  # no remote at all: every version's only copy is here
            published = set()
        except RemoteError:
            published = {f"refs/tags/{v.tag}" for v, _ in versions}
    branch = set(dict(registry.tree_pointers("HEAD")).values()) if registry.git.head() else set()
    lost = "no remote has it: register it again from its source folder"
    return {
        ref: lost if f"refs/tags/{version.tag}" not in published else f"adapters pull {ref}"
        for version, (ref, md5) in versions
        if md5 in branch or f"refs/tags/{version.tag}" not in published
    }
