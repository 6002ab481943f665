"""Pull and clone: refs fetched first, then every file they need, hashes verified before the workspace changes."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from adapterctl.core.errors import Conflict, RegistryError
from adapterctl.registry import store
from adapterctl.registry.git import Git, Tag
from adapterctl.registry.git import clone as git_clone
from adapterctl.registry.merge import abandon_merge, merge
from adapterctl.registry.names import Ref
from adapterctl.registry.refs import AdapterVersion, State
from adapterctl.registry.remotes import REMOTE_TAGS, resolve_remote
from adapterctl.registry.renumber import renumber, unassign_displaced
from adapterctl.registry.repo import ADAPTERS_DIR, Registry


@dataclass
class PullResult:
    """What a pull brought."""

    remote: str
    new_tags: list[str] = field(default_factory=list)
    renumbered: dict[str, str] = field(default_factory=dict)
    versions: list[str] = field(default_factory=list)
    files: int = 0
    merged: str = "up to date"


@dataclass
class _Fetched:
    """The remote's tags as fetched, beside this clone's own, and where its branch was fetched to."""

    theirs: dict[str, Tag]
    ours: dict[str, Tag]
    branch: str

    @property
    def kept(self) -> list[Tag]:
        """The tags after the pull: the remote's win a clash; clashing local tags get new numbers."""
        return [*self.theirs.values(), *(t for n, t in self.ours.items() if n not in self.theirs)]


def pull(registry: Registry, refs: list[str], remote: str | None = None, force: bool = False) -> PullResult:
    """Fetch refs, then the objects of the requested versions; hashes are verified before the workspace changes.

    Local edits in a workspace folder the pull would replace are refused (FORCE discards them), as git does.
    """
    parsed = [Ref.parse(r) for r in refs]
    with registry.lock():
        remote = resolve_remote(registry, remote)
        branch = registry.git.branch()
        abandon_merge(registry)
        fetched = _fetch(registry.git, remote, branch)
        result = PullResult(remote)
        merged = registry.state(fetched.kept)
        wanted = [merged.resolve(r) for r in parsed] or _defaults(merged)
        tip = fetched.branch if registry.git.ok("rev-parse", "--verify", "--quiet", fetched.branch) else None
        # Pointer files are compared by blob id: only those that differ are read, so the cost follows the change.
        here = registry.tree_blobs("HEAD") if registry.git.head() else {}
        resuming = registry.pull_mark.exists()
        result.files = _fetch_objects(registry, remote, wanted, here, tip, resuming, force)
        # Everything needed is here and verified: now change refs and the workspace.
        registry.pull_mark.write_text(remote)
        _take_tags(registry, fetched, merged, result)
        if tip:
            result.merged = merge(registry, tip)
        _check_out(registry, here, resuming or force)
        registry.pull_mark.unlink()
        result.versions = sorted(v.ref for v in wanted)
        return result


def _fetch(git: Git, remote: str, branch: str) -> _Fetched:
    """Fetch REMOTE's BRANCH and its tags, the tags into their own namespace: nothing of this clone's moves yet."""
    git.run(
        "fetch", "--quiet", "--no-tags", "--prune", remote,
        f"+refs/heads/{branch}:refs/remotes/{remote}/{branch}",
        f"+refs/tags/*:{REMOTE_TAGS}/{remote}/*",
        remote=True,
    )  # fmt: skip
    theirs = {t.name: t for t in git.tags(f"{REMOTE_TAGS}/{remote}")}
    ours = {t.name: t for t in git.tags()}
    return _Fetched(theirs, ours, f"refs/remotes/{remote}/{branch}")


def _defaults(state: State) -> list[AdapterVersion]:
    """Every stage head and every latest version."""
    wanted = {}
    for adapter in state.adapters.values():
        for version in [adapter.latest, *adapter.stages().values()]:
            wanted[version.ref] = version
    return list(wanted.values())


def _fetch_objects(
    registry: Registry,
    remote: str,
    wanted: list[AdapterVersion],
    here: dict[str, str],
    tip: str | None,
    resuming: bool,
    force: bool,
) -> int:
    """Fetch and verify the files of WANTED and of the folders the branch TIP changes; returns how many came.

    Local edits those folders hold are refused unless FORCE (or RESUMING a pull that already checked them).
    """
    tip_blobs = registry.tree_blobs(tip) if tip else here
    with store.opened(registry.root) as objects:
        # Of the branch tip, only what this pull will check out: the rest was verified when it arrived.
        changed_tip = registry.blob_pointers(
            {n: blob for n, blob in tip_blobs.items() if _stale(registry, n, blob, here, resuming or force)}
        )
        files = registry.ensure_objects(objects, registry.pointers(wanted) + list(changed_tip.items()), remote)
        if not force and not resuming:
            moving = registry.blob_pointers({n: blob for n, blob in here.items() if tip_blobs.get(n, blob) != blob})
            _refuse_local_changes(registry.local_changes(objects, moving))
    return files


def _stale(registry: Registry, name: str, blob: str, here: dict[str, str], every: bool) -> bool:
    """Whether the workspace folder of NAME must be (re)written for pointer BLOB: changed, absent, or EVERY."""
    return every or here.get(name) != blob or not (registry.root / ADAPTERS_DIR / name).is_dir()


def _refuse_local_changes(changes: dict[str, list[str]]) -> None:
    """Conflict naming the edited files a pull would overwrite, as git refuses to."""
    if changes:
        files = [f for name in sorted(changes) for f in changes[name]]
        raise Conflict(
            f"Your local changes to {', '.join(files)} would be overwritten by pull; copy them elsewhere "
            "(and `adapters add` them), or run `adapters pull --force` to discard them. Nothing was changed."
        )


def _take_tags(registry: Registry, fetched: _Fetched, merged: State, result: PullResult) -> None:
    """Copy the remote's new tags here, clashing local ones renumbered, in one ref transaction; noted in RESULT."""
    known = {t.name for t in merged.tags}
    made: list[Tag] = []
    for name, tag in fetched.theirs.items():
        if name not in known:
            continue  # outside the grammar, or another artifact's: not ours to copy
        mine = fetched.ours.get(name)
        if mine and mine.commit != tag.commit:  # numbered against every tag so far, renumbered ones too
            made.append(renumber(registry.git, mine, registry.state([*fetched.kept, *made])))
            result.renumbered[name] = made[-1].name
        if not mine or mine.commit != tag.commit:
            result.new_tags.append(name)
    made += unassign_displaced(registry, fetched.kept, made)
    # One transaction: a stage's unassignment and its new assignment arrive together, or neither does, and a
    # renumbered local tag gets its new name as the remote's takes the old one.
    registry.git.set_tags({**{n: fetched.theirs[n].sha for n in result.new_tags}, **{t.name: t.sha for t in made}})


def _check_out(registry: Registry, here: dict[str, str], every: bool) -> None:
    """Write the workspace folders whose version changed from HERE (or that are absent; EVERY: all) from the cache."""
    after = registry.tree_blobs("HEAD") if registry.git.head() else {}
    # Only the folders whose version changed (or that are absent): the cost follows what the pull moved.
    targets = registry.blob_pointers(
        {name: blob for name, blob in after.items() if _stale(registry, name, blob, here, every)}
    )
    with store.opened(registry.root) as objects:
        for name, md5 in targets.items():
            objects.place(md5, registry.root / ADAPTERS_DIR / name)


def clone(url: str, directory: Path | None, refs: list[str]) -> tuple[Registry, PullResult]:
    """Clone an adapter repository and pull its stage heads and latest versions (or REFS)."""
    directory = directory or Path(Path(urlparse(url).path).name.removesuffix(".git") or "registry")
    if directory.exists() and any(directory.iterdir()):
        raise Conflict(f"{directory} already exists and is not empty.")
    existed = directory.exists()
    try:
        git = git_clone(url, directory, also=f"+refs/tags/*:{REMOTE_TAGS}/origin/*")  # what pull fetches first
        if git.head() is None:  # the remote's HEAD names a branch it lacks: take the one it has
            branches = git.run("branch", "-r", "--format=%(refname:lstrip=3)").split()
            if branches:
                branch = "main" if "main" in branches else branches[0]
                git.run("checkout", "--quiet", "-B", branch, f"origin/{branch}")
        registry = Registry.around(directory)
        if registry is None:
            raise RegistryError(f"{url} is not an adapter repository (no .dvc/ and adapters/); nothing was kept.")
        return registry, pull(registry, refs)
    except BaseException:
        # A failed clone leaves nothing behind, as git's own does.
        shutil.rmtree(directory, ignore_errors=True)
        if existed:
            directory.mkdir()
        raise
