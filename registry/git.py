"""A thin wrapper over the `git` command: one call per question, errors turned into one line."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from adapterctl.core.errors import Conflict, DetachedHead, RegistryError, RemoteError

# The registry's own commits, merges, checkouts and ref updates are its bookkeeping, not the user's work: the
# user's hooks (core.hooksPath included) never run on them, as git's own plumbing runs none. A push runs one,
# pre-push: the user's say over what leaves the machine.
_PRE_PUSH = '#!/bin/sh\nexec {hook} "$@"\n'

# for-each-ref fields, separated by a byte that never occurs in names, dates or messages.
_SEP = "\x1f"
_TAG_FORMAT = (
    _SEP.join(
        [
            "%(refname)",
            "%(objecttype)",
            "%(*objectname)",
            "%(objectname)",
            "%(taggerdate:unix)",
            "%(taggername)",
            "%(taggeremail:trim)",
            "%(contents)",
            "%(contents:signature)",
        ]
    )
    + "\x1e"
)


@dataclass(frozen=True)
class Tag:
    """An annotated tag: its name, the commit it points at, who made it, when, and its message."""

    name: str
    commit: str
    date: int
    author: str
    email: str
    message: str
    sha: str = ""
    """The tag object itself."""


@dataclass(frozen=True)
class NewTag:
    """An annotated tag to create: NAME at COMMIT with MESSAGE, dated DATE (seconds since the epoch)."""

    name: str
    commit: str
    message: str
    date: int


class Git:
    """Runs git in one work tree."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def attempt(
        self, *args: str, env: dict[str, str] | None = None, input: str = ""
    ) -> subprocess.CompletedProcess[bytes]:
        """Run `git ARGS` (INPUT on stdin) without the user's hooks; the caller reads the outcome."""
        return _git(self.root, *args, env=env, input=input)

    def run(self, *args: str, env: dict[str, str] | None = None, remote: bool = False, input: str = "") -> str:
        """Run `git ARGS` (INPUT on stdin) and return stdout; a failure raises with git's own last words."""
        proc = self.attempt(*args, env=env, input=input)
        if proc.returncode != 0:
            raise _failure(args[0], proc.stderr.decode(errors="replace"), remote)
        return proc.stdout.decode()

    def ok(self, *args: str) -> bool:
        """True when `git ARGS` exits 0."""
        return self.attempt(*args).returncode == 0

    def signs(self, kind: str) -> bool:
        """Whether the user's config asks git to sign every KIND ("commit" or "tag") object."""
        proc = self.attempt("config", "--type=bool", "--get", f"{kind}.gpgSign")
        return proc.stdout.strip() == b"true"

    def signing(self, kind: str, *args: str, env: dict[str, str] | None = None, input: str = "") -> str:
        """`run` for a command that writes a KIND object the user's config has git sign: a failure to sign says so."""
        proc = self.attempt(*args, env=env, input=input)
        if proc.returncode == 0:
            return proc.stdout.decode()
        stderr = proc.stderr.decode(errors="replace")
        if self.signs(kind):
            raise RegistryError(
                f"git could not sign the {kind} ({kind}.gpgSign is set: {_last_words(stderr)}); fix your signing "
                f"key, or turn signing off for this repository with `git config {kind}.gpgSign false`."
            )
        raise _failure(args[0], stderr, remote=False)

    @cached_property
    def git_dir(self) -> Path:
        """The repository's .git folder (absolute); asked once, as a work tree's never moves."""
        return Path(self.run("rev-parse", "--absolute-git-dir").strip())

    def branch(self) -> str:
        """The checked-out branch; a detached HEAD is refused (a commit there is on no branch, a pull has none)."""
        proc = self.attempt("symbolic-ref", "--quiet", "--short", "HEAD")
        if proc.returncode != 0:
            raise DetachedHead(
                "HEAD is detached, and the registry commits and pulls on a branch: check out one first "
                "(`git switch -` returns to the last); nothing was changed."
            )
        return proc.stdout.decode().strip()

    def head(self) -> str | None:
        """The commit HEAD points at, or None in a repository without commits."""
        if not self.ok("rev-parse", "--verify", "--quiet", "HEAD"):
            return None
        return self.run("rev-parse", "HEAD").strip()

    def tags(self, namespace: str = "refs/tags") -> list[Tag]:
        """Every annotated tag under NAMESPACE, in one git call."""
        out = self.run("for-each-ref", f"--format={_TAG_FORMAT}", namespace)
        tags = []
        for record in out.split("\x1e"):
            fields = record.strip("\n").split(_SEP)
            if len(fields) != 9 or fields[1] != "tag":
                continue  # lightweight tags carry no author or date: not ours
            ref, _, commit, sha, date, author, email, message, signature = fields
            message = message.strip().removesuffix(signature.strip()).strip()  # a signature follows the text
            tags.append(Tag(ref[len(namespace) + 1 :], commit, int(date or 0), author, email, message, sha))
        return tags

    def tag(self, name: str, commit: str, message: str, date: int) -> None:
        """Create annotated tag NAME at COMMIT, dated DATE (seconds), so tag order is strict."""
        self.create_tags([NewTag(name, commit, message, date)])

    def tag_object(self, tag: NewTag) -> str:
        """Write TAG's annotated tag object, signed when the user's tag.gpgSign asks, and no ref; returns its id."""
        if not self.signs("tag"):
            ident = self.run("var", "GIT_COMMITTER_IDENT").strip().rsplit(" ", 2)[0]
            head = f"object {tag.commit}\ntype commit\ntag {tag.name}\ntagger {ident} {tag.date} +0000\n"
            return self.run("mktag", input=f"{head}\n{tag.message}\n").strip()
        # Only `git tag` signs as the user's config says (gpg, ssh or x509), and it always writes the ref: let
        # it write that into a scratch repository sharing this one's objects and config, so no ref moves here.
        paths = self.run("rev-parse", "--path-format=absolute", "--git-path", "objects", "--git-path", "config")
        objects, config = paths.splitlines()
        scratch = Path(tempfile.mkdtemp(prefix="adapters-tag-"))
        try:
            (scratch / "refs").mkdir()
            (scratch / "HEAD").write_text("ref: refs/heads/scratch\n")
            (scratch / "config").write_text(f"[include]\n\tpath = {config}\n")
            env = {
                "GIT_DIR": str(scratch),
                "GIT_OBJECT_DIRECTORY": objects,
                "GIT_COMMITTER_DATE": f"{tag.date} +0000",
            }
            args = ("tag", "--sign", "--cleanup=verbatim", "--file=-", tag.name, tag.commit)
            self.signing("tag", *args, env=env, input=tag.message + "\n")
            return self.run("rev-parse", f"refs/tags/{tag.name}", env=env).strip()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def create_tags(self, tags: list[NewTag]) -> None:
        """Create annotated TAGS all at once: every tag object first, then every ref in one transaction.

        A reader (or a kill) sees none of them or all of them, never a stage unassigned but not yet reassigned.
        """
        updates = "".join(f"create refs/tags/{tag.name} {self.tag_object(tag)}\n" for tag in tags)
        try:
            self.run("update-ref", "--stdin", input="start\n" + updates + "commit\n")
        except RegistryError as exc:
            if "reference already exists" in str(exc):
                raise Conflict(f"{', '.join(t.name for t in tags)}: a tag of that name already exists.") from None
            raise

    def set_tags(self, refs: dict[str, str]) -> None:
        """Point each tag NAME of REFS {NAME: tag object} at its object, made or moved, all in one transaction."""
        lines = "".join(f"update refs/tags/{name} {sha}\n" for name, sha in refs.items())
        self.run("update-ref", "--stdin", input=f"start\n{lines}commit\n")

    def push(self, remote: str, refspecs: list[str]) -> subprocess.CompletedProcess[bytes]:
        """`git push --atomic --porcelain REMOTE REFSPECS`, running the user's pre-push hook and no other."""
        where = _git(self.root, "rev-parse", "--path-format=absolute", "--git-path", "hooks/pre-push", hooks=None)
        hook = Path(where.stdout.decode().strip())
        with tempfile.TemporaryDirectory(prefix="adapters-hooks-") as hooks:
            if os.access(hook, os.X_OK):  # called through a script, so the hook still finds what sits beside it
                wrapper = Path(hooks) / "pre-push"
                wrapper.write_text(_PRE_PUSH.format(hook=shlex.quote(str(hook))))
                wrapper.chmod(0o755)
            return _git(self.root, "push", "--atomic", "--porcelain", remote, *refspecs, hooks=hooks)

    def remotes(self) -> list[str]:
        """Names of the configured remotes."""
        return self.run("remote").split()

    def commit_paths(self, message: str, *paths: str) -> bool:
        """Stage and commit PATHS alone, if they changed; returns whether a commit was made."""
        self.run("add", *paths)
        if self.ok("diff", "--cached", "--quiet", "--", *paths):
            return False
        self.signing("commit", "commit", "--quiet", "-m", message, "--", *paths)
        return True

    def commit_tree(self, tree: str, parent: str | None, message: str) -> str:
        """Write a commit of TREE on PARENT; signed when commit.gpgSign asks (`git commit-tree` ignores it)."""
        sign = ["-S"] if self.signs("commit") else []
        parents = ["-p", parent] if parent else []
        return self.signing("commit", "commit-tree", *sign, tree, *parents, "-m", message).strip()

    def show(self, rev: str, path: str) -> str | None:
        """The text of PATH at REV, or None when it is not there."""
        proc = self.attempt("show", f"{rev}:{path}")
        return proc.stdout.decode() if proc.returncode == 0 else None

    def show_many(self, specs: list[str]) -> list[str | None]:
        """The text of many REV:PATH objects in one `git cat-file --batch` call."""
        if not specs:
            return []
        proc = self.attempt("cat-file", "--batch", input="\n".join(specs) + "\n")
        data, pos, texts = proc.stdout, 0, []
        for _ in specs:
            end = data.index(b"\n", pos)
            header = data[pos:end].split()
            pos = end + 1
            if len(header) < 3 or header[-1] == b"missing":
                texts.append(None)
                continue
            size = int(header[2])
            texts.append(data[pos : pos + size].decode())
            pos += size + 1
        return texts

    def exist_many(self, specs: list[str]) -> list[bool]:
        """Whether each REV:PATH object exists, in one `git cat-file --batch-check` call."""
        if not specs:
            return []
        out = self.run("cat-file", "--batch-check", input="\n".join(specs) + "\n")
        return [not line.endswith(" missing") for line in out.splitlines()]

    def remote_refs(self, remote: str) -> dict[str, str]:
        """Refs on REMOTE (branches and tags) mapped to the commits they point at, tags peeled."""
        out = self.run("ls-remote", "--heads", "--tags", remote, remote=True)
        refs: dict[str, str] = {}
        for line in out.splitlines():
            sha, ref = line.split("\t")
            if ref.endswith("^{}"):
                refs[ref[:-3]] = sha  # peeled: the commit an annotated tag points at
            else:
                refs.setdefault(ref, sha)
        return refs

    def remote_tag_objects(self, remote: str) -> dict[str, str]:
        """Tags on REMOTE mapped to the objects their refs hold (annotated tags unpeeled), in one call."""
        out = self.run("ls-remote", "--tags", "--refs", remote, remote=True)
        return {ref.removeprefix("refs/tags/"): sha for sha, ref in (line.split("\t") for line in out.splitlines())}

    def tag_objects(self) -> dict[str, str]:
        """Every tag here, annotated or not, mapped to the object its ref holds, in one call."""
        out = self.run("for-each-ref", "--format=%(objectname) %(refname:lstrip=2)", "refs/tags")
        return {name: sha for sha, name in (line.split(" ", 1) for line in out.splitlines())}


def toplevel(path: Path) -> Path | None:
    """The work tree that contains PATH, or None outside git."""
    proc = _git(path, "rev-parse", "--show-toplevel")
    return Path(proc.stdout.decode().strip()) if proc.returncode == 0 else None


def init_bare(path: Path, branch: str) -> None:
    """Make PATH an empty bare repository whose HEAD names BRANCH."""
    proc = _git(Path.cwd(), "init", "--quiet", "--bare", f"--initial-branch={branch}", str(path))
    if proc.returncode != 0:
        raise RegistryError(f"git init {path} failed: {_last_words(proc.stderr.decode(errors='replace'))}")


def clone(url: str, directory: Path, also: str | None = None) -> Git:
    """Clone URL into DIRECTORY (its checkout runs no hook of the user's); returns the new work tree.

    ALSO: one more refspec of the remote to fetch, for this clone only (not kept in its config). Fetched here, its
    refs are written in the clone's single packed file, where a later fetch writes a file per ref.
    """
    extra = ("-c", f"remote.origin.fetch={also}") if also else ()
    proc = _git(Path.cwd(), *extra, "clone", "--quiet", url, str(directory))
    if proc.returncode != 0:
        raise RemoteError(f"git clone {url} failed: {_last_words(proc.stderr.decode(errors='replace'))}")
    return Git(directory)


def _git(
    cwd: Path, *args: str, env: dict[str, str] | None = None, input: str = "", hooks: str | None = os.devnull
) -> subprocess.CompletedProcess[bytes]:
    """The one place the registry runs git: in CWD, hooks from folder HOOKS (default none; None: the user's)."""
    return subprocess.run(
        ["git", *(("-c", f"core.hooksPath={hooks}") if hooks else ()), *args],
        cwd=cwd,
        capture_output=True,
        input=input.encode(),
        env={**os.environ, **(env or {})},
    )


def _failure(command: str, stderr: str, remote: bool) -> RegistryError:
    """The one-line error for a failed `git COMMAND` that wrote STDERR."""
    if "Please tell me who you are" in stderr:
        return RegistryError(
            "git does not know who you are, and every version records its author: run "
            "`git config --global user.name 'Your Name'` and `git config --global user.email you@example.com`."
        )
    return (RemoteError if remote else RegistryError)(f"git {command} failed: {_last_words(stderr)}")


def _last_words(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("hint:")]
    return "; ".join(lines[-2:]) if lines else "no message"
