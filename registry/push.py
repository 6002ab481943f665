"""Push: the DVC objects of every version the remote lacks first, then the branch and tags in one atomic git push."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from adapterctl.core.errors import Conflict, RemoteError
from adapterctl.registry import store
from adapterctl.registry.git import Git
from adapterctl.registry.names import check_name
from adapterctl.registry.refs import State, tag_adapter
from adapterctl.registry.remotes import resolve_remote
from adapterctl.registry.repo import Registry

# How git reports a ref another push got to first: a branch moved on, a tag (a stage's too) taken, a ref that
# moved while this push held it. The push is atomic, so every other ref is reported "atomic push failed".
_LOST_RACE = re.compile(
    r"fetch first|non-fast-forward|already exists|cannot lock ref|failed to update ref|incorrect old value|stale info"
)
FETCH_FIRST = "{remote} has versions or commits this registry lacks; run `adapters pull`, then push again."


@dataclass
class PushResult:
    """What a push moved."""

    remote: str
    tags: list[str] = field(default_factory=list)
    files: int = 0
    branch_updated: bool = False
    repaired: list[str] = field(default_factory=list)
    """Versions whose remote copies were missing or corrupt and were uploaded again."""


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
