"""A thin wrapper over the `git` command: one call per question, errors turned into one line."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from core.errors import Conflict, RegistryError, RemoteError

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

    def run(self, *args: str, env: dict[str, str] | None = None, remote: bool = False, input: str = "") -> str:
        """Run `git ARGS` (INPUT on stdin) and return stdout; a failure raises with git's own last words."""
        proc = subprocess.run(
            ["git", *args],
            cwd=self.root,
            capture_output=True,
            input=input.encode(),
            env={**os.environ, **(env or {})},
        )
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace")
            if "Please tell me who you are" in stderr:
                raise RegistryError(
                    "git does not know who you are, and every version records its author: run "
                    "`git config --global user.name 'Your Name'` and `git config --global user.email you@example.com`."
                )
            error = RemoteError if remote else RegistryError
            raise error(f"git {args[0]} failed: {_last_words(stderr)}")
        return proc.stdout.decode()

    def ok(self, *args: str) -> bool:
        """True when `git ARGS` exits 0."""
        return subprocess.run(["git", *args], cwd=self.root, capture_output=True).returncode == 0

    @property
    def git_dir(self) -> Path:
        """The repository's .git folder (absolute)."""
        return Path(self.run("rev-parse", "--absolute-git-dir").strip())

    def branch(self) -> str:
        """The checked-out branch; a detached HEAD is refused."""
        name = self.run("symbolic-ref", "--quiet", "--short", "HEAD").strip()
        if not name:
            raise RegistryError("HEAD is detached: check out a branch first (git switch main).")
        return name

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
            if len(fields) != 8 or fields[1] != "tag":
                continue  # lightweight tags carry no author or date: not ours
            ref, _, commit, sha, date, author, email, message = fields
            tags.append(Tag(ref[len(namespace) + 1 :], commit, int(date or 0), author, email, message.strip(), sha))
        return tags

    def tag(self, name: str, commit: str, message: str, date: int) -> None:
        """Create annotated tag NAME at COMMIT, dated DATE (seconds), so tag order is strict."""
        self.create_tags([NewTag(name, commit, message, date)])

    def create_tags(self, tags: list[NewTag]) -> None:
        """Create annotated TAGS all at once: every tag object first, then every ref in one transaction.

        A reader (or a kill) sees none of them or all of them, never a stage unassigned but not yet reassigned.
        """
        ident = self.run("var", "GIT_COMMITTER_IDENT").strip().rsplit(" ", 2)[0]
        updates = []
        for tag in tags:
            body = (
                f"object {tag.commit}\ntype commit\ntag {tag.name}\ntagger {ident} {tag.date} +0000\n\n{tag.message}\n"
            )
            updates.append(f"create refs/tags/{tag.name} {self.run('mktag', input=body).strip()}\n")
        try:
            self.run("update-ref", "--stdin", input="start\n" + "".join(updates) + "commit\n")
        except RegistryError as exc:
            if "reference already exists" in str(exc):
                raise Conflict(f"{', '.join(t.name for t in tags)}: a tag of that name already exists.") from None
            raise

    def delete_tags(self, names: list[str]) -> None:
        """Delete tags NAMES in one transaction."""
        self.run("update-ref", "--stdin", input="".join(f"delete refs/tags/{name}\n" for name in names))

    def remotes(self) -> list[str]:
        """Names of the configured remotes."""
        return self.run("remote").split()

    def commit_paths(self, message: str, *paths: str) -> bool:
        """Stage and commit PATHS alone, if they changed; returns whether a commit was made."""
        self.run("add", *paths)
        if self.ok("diff", "--cached", "--quiet", "--", *paths):
            return False
        self.run("commit", "--quiet", "-m", message, "--", *paths)
        return True

    def show(self, rev: str, path: str) -> str | None:
        """The text of PATH at REV, or None when it is not there."""
        proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=self.root, capture_output=True)
        return proc.stdout.decode() if proc.returncode == 0 else None

    def show_many(self, specs: list[str]) -> list[str | None]:
        """The text of many REV:PATH objects in one `git cat-file --batch` call."""
        if not specs:
            return []
        proc = subprocess.run(
            ["git", "cat-file", "--batch"], cwd=self.root, input="\n".join(specs).encode() + b"\n", capture_output=True
        )
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


def toplevel(path: Path) -> Path | None:
    """The work tree that contains PATH, or None outside git."""
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True)
    return Path(proc.stdout.decode().strip()) if proc.returncode == 0 else None


def _last_words(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("hint:")]
    return "; ".join(lines[-2:]) if lines else "no message"
