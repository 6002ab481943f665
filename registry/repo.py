"""The adapter repository: register versions, assign stages, read back exact files."""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import yaml

from adapterctl.core.cache import locked, write_atomic
from adapterctl.registry import folder, store
from adapterctl.core.errors import Conflict, IntegrityError, InvalidName, NotFound, RegistryError, first_line
from adapterctl.registry.git import Git, NewTag, Tag, toplevel
from adapterctl.registry.names import (
    BUMPS,
    FIRST_VERSION,
    Ref,
    Version,
    check_message,
    check_name,
    check_stage,
    version_ref,
)
from adapterctl.registry.refs import AdapterVersion, State, tag_adapter, unassignments, with_action

ADAPTERS_DIR = "adapters"
PROJECT_FILE = "dvc.yaml"
_README = """# Adapters

Each folder here is a LoRA adapter tracked by DVC (`NAME.dvc` holds its hashes; the files live in the DVC
cache and remote). Versions are git tags `NAME@vX.Y.Z`, stages are tags `NAME#STAGE#N` (GTO's grammar),
and every adapter is declared under `artifacts:` in `dvc.yaml`.

    adapters list                 # names, latest versions, stages
    adapters log NAME             # every version with metrics and stage history
    adapters checkout NAME#prod   # that version's exact files
"""


class Registry:
    """An adapter repository: a git work tree with DVC, an `adapters/` folder and tags in GTO's grammar."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.git = Git(root)
        self._warned: set[str] = set()

    @classmethod
    def find(cls, path: Path | None = None) -> Registry:
        """The registry around PATH (default: the current folder)."""
        path = (path or Path.cwd()).resolve()
        registry = cls.around(path)
        if registry is None:
            raise RegistryError(
                f"{path} is not inside an adapter repository; run `adapters init` or `adapters clone URL`."
            )
        return registry

    @classmethod
    def around(cls, path: Path) -> Registry | None:
        """The registry around PATH, or None when PATH is not inside one; RegistryError if it holds links out."""
        path = path.resolve()
        root = toplevel(path) if path.is_dir() else None
        if root is None:
            return None
        store.refuse_links(root, root / ".dvc")
        store.refuse_links(root, root / ADAPTERS_DIR, entries=True)
        if not (root / ".dvc").is_dir() or not (root / ADAPTERS_DIR).is_dir():
            return None
        return cls(root)

    @classmethod
    def init(cls, path: Path) -> tuple[Registry, list[str]]:
        """Make PATH (or the git repository around it) an adapter repository; returns what was done."""
        path.mkdir(parents=True, exist_ok=True)
        done = []
        root = toplevel(path)
        if root is None:
            Git(path).run("init", "--quiet", "--initial-branch=main")
            root = path.resolve()
            done.append("initialised git")
        registry = cls(root)
        with registry.lock():
            if not (root / ".dvc").is_dir():
                store.init(root)
                done.append("initialised DVC")
            readme = root / ADAPTERS_DIR / "README.md"
            if not readme.exists():
                readme.parent.mkdir(exist_ok=True)
                readme.write_text(_README)
                done.append(f"created {ADAPTERS_DIR}/")
            _, default = store.remotes(root)
            if not default and "origin" in registry.git.remotes():
                dvc_url = store.default_dvc_url(registry.git.run("remote", "get-url", "origin").strip())
                if dvc_url:
                    store.configure_remote(root, "origin", dvc_url, {}, default=True)
                    done.append(f"DVC remote 'origin' -> {dvc_url}")
            paths = [".dvc/config", ".dvc/.gitignore", ".dvcignore", f"{ADAPTERS_DIR}/README.md"]
            if registry.git.commit_paths("Initialise the adapter registry", *paths):
                done.append("committed")
        return registry, done

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise commands that change this repository; a second one waits instead of failing."""
        with locked(
            self.git.git_dir / "adapters.lock", waiting="Waiting for another adapters command in this repository..."
        ):
            self._recover()
            yield

    def state(self, tags: list[Tag] | None = None) -> State:
        """Every version and stage, read from the tags (default: this repository's); skipped tags are warned of once."""
        state = State(self.git.tags() if tags is None else tags, self._has_pointers)
        fresh = {tag: why for tag, why in state.skipped.items() if tag not in self._warned}
        if fresh:
            self._warned.update(fresh)
            listed = "; ".join(f"{tag} ({why})" for tag, why in sorted(fresh.items())[:5])
            more = f" and {len(fresh) - 5} more" if len(fresh) > 5 else ""
            print(f"Warning: ignoring tags that are not adapter versions: {listed}{more}.", file=sys.stderr)
        return state

    def _has_pointers(self, tags: list[Tag]) -> list[bool]:
        """Whether each register tag's commit holds adapters/NAME.dvc: asked of git once per tag object, then
        remembered (a tag object never changes), so reading a large registry's state stays cheap."""
        record = self.git.git_dir / "adapters-tag-pointers.json"
        try:
            known: dict[str, bool] = json.loads(record.read_text())
        except (OSError, ValueError):
            known = {}
        unknown = [i for i, t in enumerate(tags) if not t.sha or t.sha not in known]
        specs = [f"{tags[i].commit}:{ADAPTERS_DIR}/{tag_adapter(tags[i].name)}.dvc" for i in unknown]
        fresh = dict(zip(unknown, self.git.exist_many(specs), strict=True))
        if any(tags[i].sha for i in unknown):
            known.update((tags[i].sha, ok) for i, ok in fresh.items() if tags[i].sha)
            write_atomic(record, json.dumps(known))
        return [fresh[i] if i in fresh else known[t.sha] for i, t in enumerate(tags)]

    def dvcfile(self, version: AdapterVersion) -> str:
        """The pointer file of VERSION as committed."""
        text = self.git.show(version.commit, f"{ADAPTERS_DIR}/{version.name}.dvc")
        if text is None:
            raise RegistryError(f"{version.ref} points at a commit without {ADAPTERS_DIR}/{version.name}.dvc.")
        return text

    def meta(self, version: AdapterVersion) -> dict[str, Any]:
        """The summary recorded with VERSION (base, rank, metrics, dataset)."""
        return _summary(self.dvcfile(version))

    def metas(self, versions: list[AdapterVersion]) -> list[dict[str, Any]]:
        """Summaries of many versions: remembered ones unread, the others read in one git call."""
        found = self._remembered("adapters-pointer-metas.json", [_pointer(v) for v in versions], _summary)
        return [meta if meta is not None else {} for meta in found]

    def _remembered(self, record: str, specs: list[str], read: Callable[[str], Any]) -> list[Any]:
        """READ(text) of each pointer file SPECS names (COMMIT:PATH or a blob id; None where absent), kept in
        .git/RECORD.

        Such a spec names one file for ever: only those not seen before are read from git (in one call), so
        commands over thousands of versions parse none of them twice. A value that does not come back from JSON
        as it went in is read afresh each time instead.
        """
        path = self.git.git_dir / record
        try:
            known: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        unknown = list(dict.fromkeys(spec for spec in specs if spec not in known))
        fresh = {}
        for spec, text in zip(unknown, self.git.show_many(unknown), strict=True):
            fresh[spec] = read(text) if text is not None else None
        kept = {spec: value for spec, value in fresh.items() if value is not None and _round_trips(value)}
        if kept:
            write_atomic(path, json.dumps({**known, **kept}))
        return [fresh[spec] if spec in fresh else known[spec] for spec in specs]

    def add(
        self,
        name: str,
        source: Path,
        version: str | None = None,
        bump: str | None = None,
        message: str | None = None,
        meta: dict[str, Any] | None = None,
        allow_unservable: bool = False,
    ) -> AdapterVersion:
        """Register the adapter folder SOURCE as a new immutable version of NAME; META joins its recorded summary.

        ALLOW_UNSERVABLE registers an adapter whose LoRA options the server cannot apply (refused when served)."""
        check_name(name)
        message = check_message(message)
        try:  # what is wrong at a glance is refused before the lock and the copy
            folder.check(source, scan=False, allow_unservable=allow_unservable)
        except folder.Unservable as exc:
            raise folder.Unservable(f"{exc}; to keep it anyway (refused when served): --allow-unservable.") from None
        workspace = self.root / ADAPTERS_DIR / name
        if source.resolve() == workspace.resolve():
            raise RegistryError(f"{source} is the registry's own copy; register the folder training wrote instead.")
        with self.lock():
            self.git.branch()  # a detached HEAD is refused before anything is written
            state = self.state()
            adapter = state.adapters.get(name) or state.deprecated.get(name)
            number = self._next_version(name, adapter, version, bump)
            tag = version_ref(name, number)
            with self._restoring(name):
                _replace_folder(source, workspace)
                # The copy taken under the lock is what is checked.
                summary = folder.check(workspace, shown=source, allow_unservable=allow_unservable)
                store.track(self.root, f"{ADAPTERS_DIR}/{name}")
                pointer = workspace.with_suffix(".dvc")
                data = yaml.safe_load(pointer.read_text())
                try:  # registered only once every file is stored, hash checked
                    with store.opened(self.root) as objects:
                        objects.verify(store.dir_md5(pointer.read_text()))
                except IntegrityError as exc:
                    raise IntegrityError(
                        f"{tag}: the DVC cache did not keep its files ({exc}); nothing was registered."
                    ) from None
                data["meta"] = {"adapter": name, "version": str(number)[1:], **summary, **(meta or {})}
                pointer.write_text(yaml.safe_dump(data, sort_keys=False))
                paths = [str(p.relative_to(self.root)) for p in (pointer, workspace.parent / ".gitignore")]
                subject = f"Register {tag}" + (f": {message}" if message else "")
                commit = self._commit_registration(name, paths, subject)
                self.git.tag(tag, commit, message or f"Register {tag}", _next_date(adapter))
            self._declare_in_workspace(name)
            return self.state().resolve(tag)

    def _commit_registration(self, name: str, paths: list[str], subject: str) -> str:
        """Commit PATHS and NAME's declaration in dvc.yaml, and nothing else; returns the commit.

        Built in a private index from HEAD, so other staged or unstaged edits (dvc.yaml's included) are
        neither committed nor touched; the real index then learns the committed versions of these paths.
        """
        head = self.git.head()
        project = _declared(self.git.show("HEAD", PROJECT_FILE) if head else None, name)
        blobs = {path: self.git.run("hash-object", "-w", "--", path).strip() for path in paths}
        blobs[PROJECT_FILE] = self.git.run("hash-object", "-w", "--stdin", input=project).strip()
        index = self.git.git_dir / "adapters-index"
        env = {"GIT_INDEX_FILE": str(index)}
        try:
            self.git.run("read-tree", *([head] if head else ["--empty"]), env=env)
            entries = "".join(f"100644 {blob}\t{path}\n" for path, blob in blobs.items())
            self.git.run("update-index", "--add", "--index-info", input=entries, env=env)
            tree = self.git.run("write-tree", env=env).strip()
        finally:
            index.unlink(missing_ok=True)
        commit = self.git.commit_tree(tree, head, subject)
        self.git.run("update-ref", "HEAD", commit, *([head] if head else []))
        self.git.run("update-index", "--add", "--index-info", input=entries)
        return commit

    def _declare_in_workspace(self, name: str) -> None:
        """Add NAME's declaration to the work tree's dvc.yaml too, keeping its comments and other edits."""
        path = self.root / PROJECT_FILE
        text = path.read_text() if path.exists() else None
        updated = _declared(text, name)
        if updated != text:
            path.write_text(updated)

    def _next_version(self, name: str, adapter: Any, version: str | None, bump: str | None) -> Version:
        if version and bump:
            raise RegistryError("Give --version or --bump, not both.")
        if bump and bump not in BUMPS:
            raise RegistryError(f"--bump must be one of {', '.join(BUMPS)}.")
        if version:
            number = Version.parse(version)
        elif adapter:
            number = adapter.taken[-1].bump(bump or "minor")
            if not number.fits():
                raise InvalidName(
                    f"{version_ref(name, adapter.taken[-1])} has no next {bump or 'minor'} version "
                    "(each part is at most 999999); give --version or another --bump."
                )
        else:
            number = FIRST_VERSION
        if adapter and number in adapter.taken:
            raise Conflict(
                f"{version_ref(name, number)} already exists and versions are immutable; "
                "register with --bump or another --version."
            )
        return number

    @contextmanager
    def _restoring(self, name: str) -> Iterator[None]:
        """Put the workspace, index and branch back as they were if registering fails part-way.

        A mark file records what is under way, so a registration killed outright is undone by the next command.
        """
        workspace = self.root / ADAPTERS_DIR / name
        backup = workspace.parent / f".{name}.previous"
        self._add_mark.write_text(f"{name}\n{self.git.head() or ''}\n")
        if workspace.exists():
            workspace.rename(backup)
        try:
            yield
        except BaseException:
            self._undo_add()
            raise
        shutil.rmtree(backup, ignore_errors=True)
        self._add_mark.unlink()

    @property
    def _add_mark(self) -> Path:
        return self.git.git_dir / "adapters-add-in-progress"

    def _undo_add(self) -> None:
        """Undo the registration the mark file describes: branch, index entries and workspace as before."""
        name, head = self._add_mark.read_text().split("\n")[:2]
        workspace = self.root / ADAPTERS_DIR / name
        backup = workspace.parent / f".{name}.previous"
        if self.git.head() != (head or None):  # committed, but no tag: no commit without its version
            self.git.run("update-ref", *(["HEAD", head] if head else ["-d", "HEAD"]))
        if backup.exists():
            shutil.rmtree(workspace, ignore_errors=True)
            backup.rename(workspace)
        elif not (head and self.git.ok("cat-file", "-e", f"HEAD:{ADAPTERS_DIR}/{name}.dvc")):
            shutil.rmtree(workspace, ignore_errors=True)  # a first version: there was no folder before
        for path in [f"{ADAPTERS_DIR}/{name}.dvc", f"{ADAPTERS_DIR}/.gitignore"]:  # dvc.yaml is only touched after
            if head and self.git.ok("cat-file", "-e", f"HEAD:{path}"):
                self.git.run("checkout", "HEAD", "--", path)
            else:
                self.git.ok("rm", "--cached", "--quiet", "--", path)
                (self.root / path).unlink(missing_ok=True)
        self._add_mark.unlink()

    def _recover(self) -> None:
        """Finish what a killed command left: a registration whose tag exists is kept, any other is undone."""
        if not self._add_mark.exists():
            return
        name, head = self._add_mark.read_text().split("\n")[:2]
        now = self.git.head()
        tagged = (
            now
            and now != (head or None)
            and any(t.commit == now and tag_adapter(t.name) == name for t in self.git.tags())
        )
        if tagged:
            shutil.rmtree(self.root / ADAPTERS_DIR / f".{name}.previous", ignore_errors=True)
            self._declare_in_workspace(name)
            self._add_mark.unlink()
        else:
            self._undo_add()

    def promote(self, ref: str, stage: str, message: str | None = None) -> tuple[AdapterVersion, AdapterVersion | None]:
        """Assign STAGE to the version REF means; returns it and the version that held the stage before."""
        check_stage(stage)
        message = check_message(message)
        with self.lock():
            state = self.state()
            version = state.resolve(Ref.parse(ref))
            text = message or f"Promote {version.ref} to {stage}"
            return version, self._assign(state, version, stage, text, "promote")

    def rollback(self, name: str, stage: str, to: str | None = None) -> tuple[AdapterVersion, AdapterVersion]:
        """Give STAGE back to the version that held it before (or TO); returns (now, was)."""
        check_name(name)
        check_stage(stage)
        with self.lock():
            state = self.state()
            adapter = state.adapter(name)
            current = adapter.stages().get(stage)
            if current is None:
                raise NotFound(f"No version of {name} holds stage {stage!r}; nothing to roll back.")
            if to:
                target = state.resolve(Ref.parse(to))
                if target.name != name:
                    raise RegistryError(f"--to {to} is not a version of {name}.")
            else:
                history = adapter.history(stage)
                if len(history) < 2:
                    raise NotFound(f"{current.ref} is the first version to hold {stage}; nothing earlier to return to.")
                target = adapter.version(history[-2])
            if target.version == current.version:
                raise Conflict(f"{target.ref} already holds {stage}.")
            message = f"Roll back {name}#{stage} from {current.version} to {target.version}"
            self._assign(state, target, stage, message, "rollback")
            return target, current

    def _assign(
        self, state: State, version: AdapterVersion, stage: str, message: str, action: str
    ) -> AdapterVersion | None:
        """Tag VERSION with STAGE and unassign every version that held it, all in one ref transaction."""
        self.git.branch()  # a detached HEAD is refused, as for every command that writes
        adapter = state.adapter(version.name)
        previous = adapter.stages().get(stage)
        if previous and previous.version == version.version:
            return previous
        date = _next_date(adapter)
        tags = unassignments(adapter, stage, version.version, message, date)
        assign = f"{version.name}#{stage}#{adapter.last_counter + len(tags) + 1}"
        tags.append(NewTag(assign, version.commit, with_action(message, action), date + len(tags)))
        self.git.create_tags(tags)
        return previous

    def checkout(self, ref: str | AdapterVersion, output: Path, remote: str | None = None) -> AdapterVersion:
        """Write the exact files of REF to OUTPUT, fetching them from the DVC remote when missing locally."""
        version = ref if isinstance(ref, AdapterVersion) else self.state().resolve(Ref.parse(ref))
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            kind = "is not empty" if output.is_dir() else "is a file"
            raise Conflict(f"{output} already exists and {kind}; choose another -o folder.")
        blocking = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
        if blocking:
            raise Conflict(f"{blocking} is a file, so {output} cannot be created; choose another -o folder.")
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.exists():
            output.rmdir()
        md5 = store.dir_md5(self.dvcfile(version))
        with store.opened(self.root) as objects:
            self.ensure_objects(objects, [(version.ref, md5)], remote)
            objects.materialize(md5, output)
        return version

    def pointers(self, versions: list[AdapterVersion]) -> list[tuple[str, str]]:
        """(NAME@vX.Y.Z, folder object) for each version whose commit holds its pointer file (new ones read at once)."""
        md5s = self._remembered(_FOLDER_OBJECTS, [_pointer(v) for v in versions], _folder_object)
        return [(v.ref, md5) for v, md5 in zip(versions, md5s, strict=True) if md5]

    def tree_blobs(self, rev: str) -> dict[str, str]:
        """{NAME: blob id of adapters/NAME.dvc} at REV, in one call: equal ids mean the same version, unread."""
        out = self.git.run("ls-tree", rev, f"{ADAPTERS_DIR}/")
        rows = (line.split("\t", 1) for line in out.splitlines())
        return {Path(path).stem: meta.split()[2] for meta, path in rows if path.endswith(".dvc")}

    def blob_pointers(self, blobs: dict[str, str]) -> dict[str, str]:
        """{NAME: folder object} for the pointer-file blobs {NAME: blob id}; blobs not seen before read in one call."""
        md5s = self._remembered(_FOLDER_OBJECTS, list(blobs.values()), _folder_object)
        return {name: md5 for name, md5 in zip(blobs, md5s, strict=True) if md5}

    def tree_pointers(self, rev: str) -> list[tuple[str, str]]:
        """(NAME, folder object) for every adapter the pointer files at REV name: what a checkout of REV holds."""
        return list(self.blob_pointers(self.tree_blobs(rev)).items())

    def registered_as(self, name: str, folder: Path, objects: store.Store | None = None) -> AdapterVersion | None:
        """The version of NAME whose files are exactly FOLDER's, if one is (newest first); OBJECTS: a store open."""
        adapter = self.state().adapters.get(name)
        if adapter is None or not folder.is_dir():
            return None
        versions = list(reversed(adapter.versions))
        with nullcontext(objects) if objects else store.opened(self.root) as opened:
            for version, (_, md5) in zip(versions, self.pointers(versions), strict=True):
                if not opened.missing_locally(md5) and not opened.changed(md5, folder):
                    return version
        return None

    @property
    def pull_mark(self) -> Path:
        """Present while a pull is moving refs and files: a pull killed then is finished by the next one."""
        return self.git.git_dir / "adapters-pull-in-progress"

    def local_changes(self, objects: store.Store, pointers: dict[str, str]) -> dict[str, list[str]]:
        """Files edited, added or removed in each workspace folder adapters/NAME, against POINTERS {NAME: object}."""
        changes = {}
        for name, md5 in pointers.items():
            folder = self.root / ADAPTERS_DIR / name
            if folder.is_dir() and not objects.missing_locally(md5):
                changed = objects.changed(md5, folder)
                # Another registered version (left by a `git checkout` of another branch) is nobody's edit.
                if changed and not self.registered_as(name, folder, objects):
                    changes[name] = [f"{ADAPTERS_DIR}/{name}/{f}" for f in changed]
        return changes

    def ensure_objects(self, objects: store.Store, wanted: list[tuple[str, str]], remote: str | None) -> int:
        """Fetch the (label, folder object) pairs the local cache lacks, then verify all; returns files fetched."""
        fetched = 0
        first_label = {md5: label for label, md5 in reversed(wanted)}  # each object once, under its first label
        for md5, label in first_label.items():
            try:
                if objects.missing_locally(md5):
                    fetched += objects.fetch([md5], remote)
                if objects.missing_locally(md5):
                    # DVC drops a download whose hash is wrong, so absent and corrupt look alike here.
                    raise IntegrityError(
                        "its files are missing or corrupt on the DVC remote; in a clone that has them "
                        "(`adapters verify` there says so), `adapters push --verify` uploads them again"
                    )
                objects.verify(md5)
            except IntegrityError as exc:
                raise IntegrityError(f"{label}: {exc}; nothing was changed.") from None
        return fetched

    def files(self, version: AdapterVersion, remote: str | None = None) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """VERSION's file hashes and its parsed adapter_config.json and lineage.json."""
        md5 = store.dir_md5(self.dvcfile(version))
        with store.opened(self.root) as objects:
            self.ensure_objects(objects, [(version.ref, md5)], remote)
            entries = objects.listing(md5)
            docs = {}
            for name in (folder.CONFIG, folder.LINEAGE):
                raw = objects.read(md5, name)
                docs[name] = yaml.safe_load(raw) if raw else {}
        return entries, docs


# Where the folder object each pointer file records is remembered (see Registry._remembered).
_FOLDER_OBJECTS = "adapters-pointer-objects.json"
# libyaml's parser where PyYAML was built with it: ten times faster on the pointer files a log reads.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _pointer(version: AdapterVersion) -> str:
    """COMMIT:PATH of VERSION's pointer file."""
    return f"{version.commit}:{ADAPTERS_DIR}/{version.name}.dvc"


def _folder_object(dvcfile: str) -> str | None:
    """The folder object a pointer file's text records (None for an empty file)."""
    return store.dir_md5(dvcfile) if dvcfile else None


def _summary(dvcfile: str) -> dict[str, Any]:
    """The `meta:` summary of a pointer file's text."""
    return (yaml.load(dvcfile, Loader=_YAML_LOADER) or {}).get("meta") or {}


def _round_trips(value: Any) -> bool:
    """Whether VALUE comes back from JSON as it is (YAML also has dates, integer keys and NaN)."""
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False


def _declared(text: str | None, name: str) -> str:
    """TEXT of a dvc.yaml with NAME declared under `artifacts:`, comments and layout kept (round-trip YAML).

    Only where it lives: what each version holds is recorded once, with the version (`adapters show`).
    """
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    try:
        data = yaml_rt.load(text or "") or {}
    except Exception as exc:  # ruamel raises a family of its own for one cause: not YAML
        raise RegistryError(f"{PROJECT_FILE} is not valid YAML ({first_line(exc)}); fix it.") from None
    if not isinstance(data, dict) or not isinstance(data.setdefault("artifacts", {}), dict):
        raise RegistryError(f"{PROJECT_FILE} must be a mapping whose `artifacts:` maps names to artifacts; fix it.")
    wanted = {"path": f"{ADAPTERS_DIR}/{name}", "type": "model", "desc": "LoRA adapter", "labels": ["lora", "peft"]}
    artifacts = data["artifacts"]
    if artifacts.get(name) == wanted and text is not None:
        return text
    artifacts[name] = wanted
    out = io.StringIO()
    yaml_rt.dump(data, out)
    return out.getvalue()


def _replace_folder(source: Path, dest: Path) -> None:
    """Copy SOURCE's plain files to DEST (which must not exist), never through a link: what is copied is checked."""
    dest.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        folder.copy_file(path, dest / path.name)


def _next_date(adapter: Any) -> int:
    """Now, or one second after the adapter's newest tag, so tag order by date is strict (GTO sorts by date)."""
    return max(int(time.time()), (adapter.last_date + 1) if adapter else 0)
