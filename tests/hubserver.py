"""A test double of the Hugging Face Hub, for tests only: the part of the Hub's HTTP API that huggingface_hub's
client calls to create a repository, commit, tag, branch, list refs, commits and files, and download files.

It keeps real history: file blobs addressed by their git blob sha1 (as the Hub's preupload and tree answers give
them), commits addressed by a sha1 over parent, files and message, branches and tags pointing at commits; a
revision resolves as on the Hub (a branch, a tag or a full commit sha). Tokens are checked as the Hub checks them:
an unknown token is a 401 "Invalid credentials", a read token or another user's namespace a 403 on writes, and a
missing or private repository is RepoNotFound (401 without a token, 404 with one). Preupload answers "regular" for
every file, so uploads travel base64-encoded inside the commit, never through LFS or Xet. `fail_next` makes the next
matching request fail with a status, to see what a client does then.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from serving import serving_app

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def blob_id(data: bytes) -> str:
    """The git blob sha1 of DATA: the Hub's oid for a file kept in git."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(seconds))


class HubError(Exception):
    """An error answer: status, message (body and X-Error-Message), and the Hub's X-Error-Code when it has one."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


@dataclass
class Commit:
    """One commit: its parent, every file it holds (path -> blob id), who made it and why."""

    oid: str
    parent: str | None
    files: dict[str, str]
    title: str
    message: str
    author: str
    date: float


@dataclass
class Repo:
    """A model repository: commits, branches and tags."""

    repo_id: str
    private: bool
    created: float = field(default_factory=time.time)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """The commit a branch, tag or full commit sha names; RevisionNotFound otherwise."""
        oid = self.branches.get(revision) or self.tags.get(revision) or revision
        if oid not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from REVISION, newest first."""
        commit: Commit | None = self.resolve(revision)
        found = []
        while commit:
            found.append(commit)
            commit = self.commits.get(commit.parent or "")
        return found


class HubServer:
    """The double's state (users, tokens, blobs, repositories) and its HTTP server on 127.0.0.1."""

    def __init__(self, tokens: dict[str, tuple[str, bool]], orgs: dict[str, list[str]]) -> None:
        self.tokens = tokens  # token -> (user, may write)
        self.orgs = orgs  # user -> organisations it may write to
        self.url = ""
        self.reset()

    def reset(self) -> None:
        """Forget every repository, blob, request and pending failure."""
        self.blobs: dict[str, bytes] = {}
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.failures: list[tuple[str, str, int]] = []

    # What tests use to set up, tamper with and inspect the Hub.

    def create(self, repo_id: str, private: bool = False) -> Repo:
        """A new repository with the Hub's initial commit (a .gitattributes)."""
        repo = self.repos[repo_id] = Repo(repo_id, private)
        self.commit(repo_id, {".gitattributes": GITATTRIBUTES}, "initial commit", author="system")
        return repo

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        title: str,
        author: str = "someone",
        deleted: tuple[str, ...] = (),
        message: str = "",
    ) -> str:
        """Commit FILES (added or replaced) and DELETED on main; returns the commit sha."""
        repo = self.repos[repo_id]
        head = repo.branches.get("main")
        tree = dict(repo.commits[head].files) if head else {}
        for path, data in files.items():
            self.blobs[blob_id(data)] = data
            tree[path] = blob_id(data)
        for path in deleted:
            tree.pop(path)
        date = time.time()
        record = [head, sorted(tree.items()), title, author, date, len(repo.commits)]
        oid = hashlib.sha1(json.dumps(record).encode()).hexdigest()
        repo.commits[oid] = Commit(oid, head, tree, title, message, author, date)
        repo.branches["main"] = oid
        return oid

    def files(self, repo_id: str, revision: str) -> dict[str, bytes]:
        """Every file at REVISION, by path."""
        tree = self.repos[repo_id].resolve(revision).files
        return {path: self.blobs[oid] for path, oid in tree.items()}

    def refs(self, repo_id: str) -> dict[str, dict[str, str]]:
        """Branches and tags, each name -> commit sha."""
        repo = self.repos[repo_id]
        return {"branches": dict(repo.branches), "tags": dict(repo.tags)}

    def fail_next(self, method: str, path_part: str, status: int) -> None:
        """Answer the next METHOD request whose path contains PATH_PART with STATUS instead of serving it."""
        self.failures.append((method, path_part, status))

    @contextmanager
    def running(self) -> Iterator[str]:
        """Serve on a free loopback port in a thread; yields the endpoint URL."""
        with serving_app(self.app(), lifespan="off") as server:
            self.url = server.url
            yield self.url

    # Access rules.

    def _user(self, request: Request) -> tuple[str | None, bool]:
        """(user, may write) for the request's token; (None, False) without one; 401 for an unknown one."""
        header = request.headers.get("authorization")
        if not header:
            return None, False
        token = header.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _member(self, user: str | None, repo_id: str) -> bool:
        namespace = repo_id.split("/")[0]
        return user is not None and (namespace == user or namespace in self.orgs.get(user, []))

    def _readable(self, request: Request, repo_id: str) -> Repo:
        user, _ = self._user(request)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._member(user, repo_id)):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, request: Request, repo_id: str) -> Repo:
        repo = self._readable(request, repo_id)
        user, write = self._user(request)
        if not (write and self._member(user, repo_id)):
            raise HubError(403, "You don't have the rights to write to this repository")
        return repo

    def _new_ref(self, request: Request, repo_id: str, kind: str, ref: str, revision: str) -> dict[str, Any]:
        """Point a new tag or branch REF at REVISION; 409 when it exists."""
        repo = self._writable(request, repo_id)
        refs = repo.tags if kind == "tags" else repo.branches
        if ref in refs:
            raise HubError(409, f"Reference {ref} already exists")
        refs[ref] = repo.resolve(revision).oid
        return {}

    # The HTTP API.

    def app(self) -> FastAPI:
        """The FastAPI application that answers as the Hub does."""
        app = FastAPI()
        base = "/api/models/{namespace}/{name}"

        @app.middleware("http")
        async def record_and_fail(request: Request, call_next: Any) -> Response:
            self.requests.append((request.method, request.url.path))
            for failure in self.failures:
                method, part, status = failure
                if request.method == method and part in request.url.path:
                    self.failures.remove(failure)
                    return _error(HubError(status, "Injected failure"))
            return await call_next(request)

        @app.exception_handler(HubError)
        async def hub_error(request: Request, exc: HubError) -> Response:
            return _error(exc)

        @app.post("/api/repos/create")
        async def create_repo(request: Request) -> Any:
            body = await request.json()
            user, write = self._user(request)
            if user is None:
                raise HubError(401, "You must be authenticated to create a repository")
            repo_id = f"{body.get('organization') or user}/{body['name']}"
            if not (write and self._member(user, repo_id)):
                raise HubError(403, f"You don't have the rights to create a model under {repo_id.split('/')[0]}")
            url = f"{self.url}/{repo_id}"
            if repo_id in self.repos:
                return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
            self.create(repo_id, private=body.get("visibility") == "private")
            return {"url": url, "name": repo_id}

        @app.post("/api/validate-yaml")
        async def validate_yaml(request: Request) -> Any:
            content = (await request.json())["content"]
            errors = []
            if content.startswith("---\n"):
                header = yaml.safe_load(content[4 : content.find("\n---", 4)]) or {}
                bases = header.get("base_model")
                for value in bases if isinstance(bases, list) else [bases] if bases else []:
                    if not _HUB_ID.fullmatch(str(value)):
                        errors.append({"message": f'"base_model" must be a Hub model id, not {value!r}'})
            return JSONResponse({"errors": errors, "warnings": []}, status_code=400 if errors else 200)

        @app.get(base)
        @app.get(base + "/revision/{revision:path}")
        async def model_info(namespace: str, name: str, request: Request, revision: str = "main") -> Any:
            repo = self._readable(request, f"{namespace}/{name}")
            commit = repo.resolve(revision)
            return {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": namespace,
                "sha": commit.oid,
                "private": repo.private,
                "createdAt": _iso(repo.created),
                "lastModified": _iso(commit.date),
                "tags": [],
                "siblings": [
                    {"rfilename": path, "size": len(self.blobs[oid]), "blobId": oid}
                    for path, oid in commit.files.items()
                ],
            }

        @app.get(base + "/refs")
        async def list_refs(namespace: str, name: str, request: Request) -> Any:
            repo = self._readable(request, f"{namespace}/{name}")

            def rows(refs: dict[str, str], kind: str) -> list[dict[str, str]]:
                return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(refs.items())]

            return {"branches": rows(repo.branches, "heads"), "tags": rows(repo.tags, "tags"), "converts": []}

        @app.get(base + "/tree/{revision}")
        async def list_tree(namespace: str, name: str, revision: str, request: Request) -> Any:
            commit = self._readable(request, f"{namespace}/{name}").resolve(revision)
            return [
                {"type": "file", "path": path, "oid": oid, "size": len(self.blobs[oid])}
                for path, oid in sorted(commit.files.items())
            ]

        @app.get(base + "/commits/{revision}")
        async def list_commits(namespace: str, name: str, revision: str, request: Request) -> Any:
            repo = self._readable(request, f"{namespace}/{name}")
            return [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author}],
                    "date": _iso(c.date),
                }
                for c in repo.history(revision)
            ]

        @app.post(base + "/preupload/{revision}")
        async def preupload(namespace: str, name: str, revision: str, request: Request) -> Any:
            repo = self._writable(request, f"{namespace}/{name}")
            existing = repo.resolve(revision).files if revision in repo.branches else {}
            files = (await request.json())["files"]
            return {
                "files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": existing.get(f["path"])}
                    for f in files
                ]
            }

        @app.post(base + "/commit/{revision}")
        async def commit(namespace: str, name: str, revision: str, request: Request) -> Any:
            repo_id = f"{namespace}/{name}"
            repo = self._writable(request, repo_id)
            user, _ = self._user(request)
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
            header = lines[0]["value"]
            if header.get("parentCommit") not in (None, repo.branches[revision]):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            added, deleted = {}, []
            for line in lines[1:]:
                path = line["value"]["path"]
                if line["key"] == "file":
                    added[path] = base64.b64decode(line["value"]["content"])
                elif line["key"] != "deletedFile":
                    raise HubError(400, f"{line['key']} for {path} is not served by this double")
                elif path not in repo.resolve(revision).files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                else:
                    deleted.append(path)
            summary, description = header["summary"], header.get("description", "")
            oid = self.commit(repo_id, added, summary, author=user or "", deleted=tuple(deleted), message=description)
            url = f"{self.url}/{repo_id}/commit/{oid}"
            return {"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": "", "pullRequestUrl": None}

        @app.post(base + "/tag/{revision}")
        async def create_tag(namespace: str, name: str, revision: str, request: Request) -> Any:
            tag = (await request.json())["tag"]
            return self._new_ref(request, f"{namespace}/{name}", "tags", tag, revision)

        @app.post(base + "/branch/{branch}")
        async def create_branch(namespace: str, name: str, branch: str, request: Request) -> Any:
            start = (await request.json()).get("startingPoint") or "main"
            return self._new_ref(request, f"{namespace}/{name}", "branches", branch, start)

        @app.delete(base + "/branch/{branch}")
        async def delete_branch(namespace: str, name: str, branch: str, request: Request) -> Any:
            repo = self._writable(request, f"{namespace}/{name}")
            if branch == "main":
                raise HubError(403, "The default branch cannot be deleted")
            if repo.branches.pop(branch, None) is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            return {}

        @app.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
        async def resolve(namespace: str, name: str, revision: str, path: str, request: Request) -> Response:
            commit = self._readable(request, f"{namespace}/{name}").resolve(revision)
            if path not in commit.files:
                raise HubError(404, "Entry not found", "EntryNotFound", commit=commit.oid)
            oid = commit.files[path]
            data = self.blobs[oid]
            headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{oid}"', "Content-Length": str(len(data))}
            return Response(b"" if request.method == "HEAD" else data, headers=headers)

        @app.api_route("/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "DELETE"])
        async def unserved(rest: str) -> Response:
            return _error(HubError(404, f"/{rest} is not served by this double"))

        return app


def _error(exc: HubError) -> Response:
    headers = {"X-Error-Message": exc.message}
    if exc.code:
        headers["X-Error-Code"] = exc.code
    if exc.commit:
        headers["X-Repo-Commit"] = exc.commit
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)
