"""Remotes, push, pull and clone: DVC objects travel first, git refs last, hashes checked on arrival."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import yaml

from adapterctl.registry import store
from adapterctl.core.errors import Conflict, NotFound, RegistryError, RemoteError
from adapterctl.registry.git import Git, NewTag, Tag, init_bare
from adapterctl.registry.git import clone as git_clone
from adapterctl.registry.names import Ref, check_name, version_ref
from adapterctl.registry.refs import ASSIGN_TAG, REGISTER_TAG, AdapterVersion, State, tag_adapter, unassignments
from adapterctl.registry.repo import ADAPTERS_DIR, PROJECT_FILE, Registry

# Remote tags are fetched here first, so a clash with a local tag is seen before anything changes.
_REMOTE_TAGS = "refs/adapters/remote-tags"
# How git reports a ref another push got to first: a branch moved on, a tag (a stage's too) taken, a ref that
# moved while this push held it. The push is atomic, so every other ref is reported "atomic push failed".
_LOST_RACE = re.compile(
    r"fetch first|non-fast-forward|already exists|cannot lock ref|failed to update ref|incorrect old value|stale info"
)
FETCH_FIRST = "{remote} has versions or commits this registry lacks; run `adapters pull`, then push again."


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
        cached = registry.git.run("for-each-ref", "--format=%(refname)", f"{_REMOTE_TAGS}/{name}").split()
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


@dataclass
class PushResult:
    """What a push moved."""

    remote: str
    tags: list[str] = field(default_factory=list)
    files: int = 0
    branch_updated: bool = False
    repaired: list[str] = field(default_factory=list)
    """Versions whose remote copies were missing or corrupt and were uploaded again."""


def _push_objects(
    registry: Registry, objects: store.Store, state: State, remote_refs: dict[str, str], remote: str, verify: bool
) -> tuple[int, list[str]]:
    """Upload what the remote lacks (or, with VERIFY, holds corrupt) of every version and the branch tip.

    Every version, published ones too, so a remote that lost files gets them back; new versions must be
    complete here (fetched if need be), and what goes up is verified first.
    """
    versions = state.every_version
    new = {v.ref for v in versions if f"refs/tags/{v.tag}" not in remote_refs}
    pointers = registry.pointers(versions) + registry.tree_pointers("HEAD")
    registry.ensure_objects(objects, [p for p in pointers if p[0] in new], None)
    present = [(label, md5) for label, md5 in pointers if not objects.missing_locally(md5)]
    lacking = objects.remote_missing([md5 for _, md5 in present], remote)
    if verify:
        for _, md5 in present:
            bad = objects.audit(md5, on_remote=True, remote=remote)
            objects.discard([oid for _, oid, problem in bad if problem == "corrupt"], on_remote=True, remote=remote)
            if bad:
                lacking.add(md5)
    upload = [(label, md5) for label, md5 in present if md5 in lacking]
    registry.ensure_objects(objects, upload, None)  # verified here before it goes up
    repaired = sorted({label for label, md5 in upload if label not in new and "@" in label})
    return objects.push([md5 for _, md5 in upload], remote), repaired


def push(registry: Registry, names: list[str], remote: str | None = None, verify: bool = False) -> PushResult:
    """Upload the objects of every version the remote lacks, then push the branch and tags in one atomic git push.

    VERIFY hashes every object on the remote first, so rotted copies are replaced too.
    """
    for name in names:
        check_name(name)
    with registry.lock():
        remote = resolve_remote(registry, remote)
        state = registry.state()
        for name in names:
            state.adapter(name)
        branch = registry.git.branch()
        remote_refs = registry.git.remote_refs(remote)
        local = {t.name: t for t in state.tags}
        for tag in local.values():
            theirs = remote_refs.get(f"refs/tags/{tag.name}")
            if theirs and theirs != tag.commit:
                raise Conflict(
                    f"{tag.name} on {remote} points at another commit; versions are immutable. "
                    "Run `adapters pull` to renumber the local one."
                )
        unpushed = [t for t in local.values() if f"refs/tags/{t.name}" not in remote_refs]
        selected = [t for t in unpushed if not names or tag_adapter(t.name) in names]
        result = PushResult(remote)
        head = registry.git.head()
        if head:
            with store.opened(registry.root) as objects:
                result.files, result.repaired = _push_objects(registry, objects, state, remote_refs, remote, verify)
        refspecs = _tag_refspecs(registry.git, remote, {t.name for t in selected})
        if head and remote_refs.get(f"refs/heads/{branch}") != head:
            refspecs.insert(0, f"refs/heads/{branch}:refs/heads/{branch}")
            result.branch_updated = True
        if refspecs:
            _push_refs(registry.git, remote, refspecs)
        result.tags = [t.name for t in selected]
        return result


def _tag_refspecs(git: Git, remote: str, names: set[str]) -> list[str]:
    """Refspecs that push the tags NAMES and no other: one pattern for every tag, less the others unless REMOTE
    holds them as they are here (a push leaves those be)."""
    if not names:
        return []
    # Not a refspec per tag: git compares every explicit refspec with every ref, which costs seconds of its CPU at a
    # few thousand tags before anything moves. Only the tags left out are named, each once.
    theirs = git.remote_tag_objects(remote)
    kept = sorted(name for name, sha in git.tag_objects().items() if name not in names and theirs.get(name) != sha)
    return ["refs/tags/*:refs/tags/*", *(f"^refs/tags/{name}" for name in kept)]


def _push_refs(git: Git, remote: str, refspecs: list[str]) -> None:
    """Push REFSPECS to REMOTE in one atomic push.

    Losing a race to another push is a Conflict that says to pull; any other refusal is one line naming the ref.
    """
    proc = git.push(remote, refspecs)
    if proc.returncode == 0:
        return
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    if _LOST_RACE.search(out + err):
        raise Conflict(FETCH_FIRST.format(remote=remote))
    # A porcelain refusal reads "!<TAB>local:remote<TAB>[rejected] (reason)"; the atomic bystanders say nothing new.
    refused = [
        f"{fields[1].split(':')[-1].removeprefix('refs/tags/')} {fields[2]}"
        for fields in (line.split("\t") for line in out.splitlines() if line.startswith("!"))
        if len(fields) == 3 and "atomic push failed" not in fields[2]
    ]
    # What is left of stderr is a pre-push hook's words, or git's own.
    lines = [
        line.strip() for line in err.splitlines() if line.strip() and not line.startswith(("hint:", "error: failed"))
    ]
    reason = (refused or lines or ["no message"])[-1]
    raise RemoteError(f"git push to {remote} failed: {reason}")


@dataclass
class PullResult:
    """What a pull brought."""

    remote: str
    new_tags: list[str] = field(default_factory=list)
    renumbered: dict[str, str] = field(default_factory=dict)
    versions: list[str] = field(default_factory=list)
    files: int = 0
    merged: str = "up to date"


def pull(registry: Registry, refs: list[str], remote: str | None = None, force: bool = False) -> PullResult:
    """Fetch refs, then the objects of the requested versions; hashes are verified before the workspace changes.

    Local edits in a workspace folder the pull would replace are refused (FORCE discards them), as git does.
    """
    parsed = [Ref.parse(r) for r in refs]
    with registry.lock():
        remote = resolve_remote(registry, remote)
        git = registry.git
        branch = git.branch()
        _abandon_merge(registry)
        git.run(
            "fetch", "--quiet", "--no-tags", "--prune", remote,
            f"+refs/heads/{branch}:refs/remotes/{remote}/{branch}",
            f"+refs/tags/*:{_REMOTE_TAGS}/{remote}/*",
            remote=True,
        )  # fmt: skip
        theirs = {t.name: t for t in git.tags(f"{_REMOTE_TAGS}/{remote}")}
        ours = {t.name: t for t in git.tags()}
        result = PullResult(remote)
        # The state after the pull: remote tags win a clash; clashing local tags get new numbers below.
        merged = registry.state([*theirs.values(), *(t for n, t in ours.items() if n not in theirs)])
        wanted = [merged.resolve(r) for r in parsed] or _defaults(merged)
        remote_branch = f"refs/remotes/{remote}/{branch}"
        has_remote_branch = git.ok("rev-parse", "--verify", "--quiet", remote_branch)
        # Pointer files are compared by blob id: only those that differ are read, so the cost follows the change.
        here = registry.tree_blobs("HEAD") if git.head() else {}
        tip = registry.tree_blobs(remote_branch) if has_remote_branch else here
        resuming = registry.pull_mark.exists()
        with store.opened(registry.root) as objects:
            # Of the branch tip, only what this pull will check out: the rest was verified when it arrived.
            changed_tip = registry.blob_pointers(
                {n: blob for n, blob in tip.items() if _stale(registry, n, blob, here, resuming or force)}
            )
            result.files = registry.ensure_objects(
                objects, registry.pointers(wanted) + list(changed_tip.items()), remote
            )
            if not force and not resuming:
                moving = registry.blob_pointers({n: blob for n, blob in here.items() if tip.get(n, blob) != blob})
                _refuse_local_changes(registry.local_changes(objects, moving))
        # Everything needed is here and verified: now change refs and the workspace.
        registry.pull_mark.write_text(remote)
        known = {t.name for t in merged.tags}
        kept = [*theirs.values(), *(t for n, t in ours.items() if n not in theirs)]
        made: list[Tag] = []
        for name, tag in theirs.items():
            if name not in known:
                continue  # outside the grammar, or another artifact's: not ours to copy
            mine = ours.get(name)
            if mine and mine.commit != tag.commit:  # numbered against every tag so far, renumbered ones too
                made.append(_renumber(git, mine, registry.state([*kept, *made])))
                result.renumbered[name] = made[-1].name
            if not mine or mine.commit != tag.commit:
                result.new_tags.append(name)
        made += _unassign_displaced(registry, kept, made)
        # One transaction: a stage's unassignment and its new assignment arrive together, or neither does, and a
        # renumbered local tag gets its new name as the remote's takes the old one.
        git.set_tags({**{n: theirs[n].sha for n in result.new_tags}, **{t.name: t.sha for t in made}})
        if has_remote_branch:
            result.merged = _merge(registry, remote_branch)
        after = registry.tree_blobs("HEAD") if git.head() else {}
        # Only the folders whose version changed (or that are absent): the cost follows what the pull moved.
        targets = registry.blob_pointers(
            {name: blob for name, blob in after.items() if _stale(registry, name, blob, here, resuming or force)}
        )
        with store.opened(registry.root) as objects:
            for name, md5 in targets.items():
                objects.place(md5, registry.root / ADAPTERS_DIR / name)
        registry.pull_mark.unlink()
        result.versions = sorted(v.ref for v in wanted)
        return result


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


def _defaults(state: State) -> list[AdapterVersion]:
    """Every stage head and every latest version."""
    wanted = {}
    for adapter in state.adapters.values():
        for version in [adapter.latest, *adapter.stages().values()]:
            wanted[version.ref] = version
    return list(wanted.values())


def _renumber(git: Git, tag: Tag, state: State) -> Tag:
    """A free name for a local, unpushed tag that clashes with the remote's, so no version is lost (no ref yet)."""
    adapter = state.adapter(tag_adapter(tag.name))
    register = REGISTER_TAG.fullmatch(tag.name)
    if register:
        new = version_ref(adapter.name, adapter.latest.version.bump("patch"))
        message = f"{tag.message} (renumbered from {register['version']}: the remote registered it first)"
    else:
        match = ASSIGN_TAG.fullmatch(tag.name)
        cancel = "!" if match["cancel"] else ""
        new = f"{adapter.name}#{match['stage']}{cancel}#{adapter.last_counter + 1}"
        message = tag.message
    return _written(git, NewTag(new, tag.commit, message, max(tag.date, adapter.last_date + 1)))


def _unassign_displaced(registry: Registry, kept: list[Tag], made: list[Tag]) -> list[Tag]:
    """Unassign the remote's holder of each stage a renumbered local assignment took over: GTO shows one holder too."""
    touched = sorted({(m["name"], m["stage"]) for t in made if (m := ASSIGN_TAG.fullmatch(t.name)) and not m["cancel"]})
    unassigned: list[Tag] = []
    for name, stage in touched:
        adapter = registry.state([*kept, *made, *unassigned]).adapters.get(name)
        head = adapter.stages().get(stage) if adapter else None
        if head:
            why = f"{head.ref} was assigned {stage} here while the remote assigned this one"
            new = unassignments(adapter, stage, head.version, why, adapter.last_date + 1)
            unassigned += [_written(registry.git, t) for t in new]
    return unassigned


def _written(git: Git, tag: NewTag) -> Tag:
    """TAG's tag object, written without a ref."""
    return Tag(tag.name, tag.commit, tag.date, "", "", tag.message, git.tag_object(tag))


def _merge(registry: Registry, remote_branch: str) -> str:
    """Bring the remote branch in: fast-forward, or merge with registry files resolved from the tags."""
    git = registry.git
    head = git.head()
    target = git.run("rev-parse", remote_branch).strip()
    if head is None:
        git.run("reset", "--quiet", "--hard", target)
        return "checked out"
    if git.ok("merge-base", "--is-ancestor", target, head):
        return "up to date"
    if git.ok("merge-base", "--is-ancestor", head, target):
        git.run("merge", "--quiet", "--ff-only", target)
        return "fast-forwarded"
    proc = git.attempt("merge", "--no-ff", "--no-commit", target)
    try:
        conflicted = git.run("diff", "--name-only", "--diff-filter=U").split()
        for path in conflicted:
            if path == PROJECT_FILE:
                _merge_project_file(registry)
            elif path == f"{ADAPTERS_DIR}/.gitignore":  # DVC's list of tracked folders: keep both sides' lines
                lines = git.run("show", f":2:{path}").splitlines() + git.run("show", f":3:{path}").splitlines()
                (registry.root / path).write_text("".join(f"{line}\n" for line in dict.fromkeys(lines)))
            elif path.startswith(f"{ADAPTERS_DIR}/") and path.endswith(".dvc"):
                name = Path(path).stem
                latest = registry.state().adapter(name).latest
                (registry.root / path).write_text(registry.dvcfile(latest))
            else:
                raise Conflict(f"{path} changed both here and on the remote; merge {remote_branch} with git yourself.")
            git.run("add", path)
        if proc.returncode != 0 and not conflicted:
            raise RegistryError(f"merging {remote_branch} failed: {proc.stderr.decode(errors='replace').strip()}")
        git.signing("commit", "commit", "--quiet", "--no-edit", "-m", f"Merge {remote_branch}")
    except BaseException:
        git.ok("merge", "--abort")  # never a merge left half-way: the next pull starts it afresh
        raise
    return "merged"


def _abandon_merge(registry: Registry) -> None:
    """Undo a merge an earlier pull began and never committed (it was killed), so this pull redoes it whole.

    A merge in progress that no pull began is the user's: refused, as `git pull` would.
    """
    if not registry.git.ok("rev-parse", "--quiet", "--verify", "MERGE_HEAD"):
        return
    if not registry.pull_mark.exists():
        raise Conflict(
            "A merge is in progress here that adapters did not start: conclude it (`git commit`) or abandon it "
            "(`git merge --abort`), then run `adapters pull`."
        )
    registry.git.run("merge", "--abort")


def _merge_project_file(registry: Registry) -> None:
    """dvc.yaml from both sides: the union of declared artifacts; any other difference is a real conflict."""
    ours = yaml.safe_load(registry.git.run("show", f":2:{PROJECT_FILE}")) or {}
    theirs = yaml.safe_load(registry.git.run("show", f":3:{PROJECT_FILE}")) or {}
    rest = {k: v for k, v in ours.items() if k != "artifacts"}
    if rest != {k: v for k, v in theirs.items() if k != "artifacts"}:
        raise Conflict(f"{PROJECT_FILE} changed both here and on the remote outside `artifacts:`; merge it with git.")
    merged = {**rest, "artifacts": {**theirs.get("artifacts", {}), **ours.get("artifacts", {})}}
    (registry.root / PROJECT_FILE).write_text(yaml.safe_dump(merged, sort_keys=False))


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


def clone(url: str, directory: Path | None, refs: list[str]) -> tuple[Registry, PullResult]:
    """Clone an adapter repository and pull its stage heads and latest versions (or REFS)."""
    directory = directory or Path(Path(urlparse(url).path).name.removesuffix(".git") or "registry")
    if directory.exists() and any(directory.iterdir()):
        raise Conflict(f"{directory} already exists and is not empty.")
    existed = directory.exists()
    try:
        git = git_clone(url, directory, also=f"+refs/tags/*:{_REMOTE_TAGS}/origin/*")  # what pull fetches first
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
