"""A pull's merge of the remote branch: a fast-forward where it can, else registry files resolved from the tags."""

from __future__ import annotations

from pathlib import Path

import yaml

from adapterctl.core.errors import Conflict, RegistryError
from adapterctl.registry.repo import ADAPTERS_DIR, PROJECT_FILE, Registry


def merge(registry: Registry, remote_branch: str) -> str:
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
            _resolve(registry, path, remote_branch)
            git.run("add", path)
        if proc.returncode != 0 and not conflicted:
            raise RegistryError(f"merging {remote_branch} failed: {proc.stderr.decode(errors='replace').strip()}")
        git.signing("commit", "commit", "--quiet", "--no-edit", "-m", f"Merge {remote_branch}")
    except BaseException:
        git.ok("merge", "--abort")  # never a merge left half-way: the next pull starts it afresh
        raise
    return "merged"


def _resolve(registry: Registry, path: str, remote_branch: str) -> None:
    """Write the merged PATH, a registry file both sides changed; any other file is the user's to merge."""
    git = registry.git
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


def _merge_project_file(registry: Registry) -> None:
    """dvc.yaml from both sides: the union of declared artifacts; any other difference is a real conflict."""
    ours = yaml.safe_load(registry.git.run("show", f":2:{PROJECT_FILE}")) or {}
    theirs = yaml.safe_load(registry.git.run("show", f":3:{PROJECT_FILE}")) or {}
    rest = {k: v for k, v in ours.items() if k != "artifacts"}
    if rest != {k: v for k, v in theirs.items() if k != "artifacts"}:
        raise Conflict(f"{PROJECT_FILE} changed both here and on the remote outside `artifacts:`; merge it with git.")
    merged = {**rest, "artifacts": {**theirs.get("artifacts", {}), **ours.get("artifacts", {})}}
    (registry.root / PROJECT_FILE).write_text(yaml.safe_dump(merged, sort_keys=False))


def abandon_merge(registry: Registry) -> None:
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
