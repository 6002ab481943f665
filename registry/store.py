"""The DVC side of the registry: content-addressed adapter files in the local cache and on remotes."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import yaml

from adapterctl.core.cache import write_atomic
from adapterctl.core.errors import IntegrityError, RegistryError, RemoteError, first_line

if TYPE_CHECKING:
    from dvc.repo import Repo


_DIR_MD5 = re.compile(r"^- md5: ([0-9a-f]{32}\.dir)$", re.MULTILINE)
_FILE_MD5 = re.compile(r"[0-9a-f]{32}")


def dir_md5(dvcfile: str) -> str:
    """The .dir hash a NAME.dvc pointer file records for its folder."""
    found = _DIR_MD5.findall(dvcfile)
    if len(found) == 1:  # the layout DVC writes, read without a YAML parse (registries hold thousands)
        return found[0]
    data = yaml.safe_load(dvcfile) or {}
    outs = data.get("outs") or [{}]
    md5 = str(outs[0].get("md5", ""))
    if not _DIR_MD5.fullmatch(f"- md5: {md5}"):  # it becomes a path into the cache: nothing but a hash
        raise RegistryError("A .dvc pointer file does not describe a folder; was it edited by hand?")
    return md5


def plain_file_name(name: object) -> bool:
    """Whether NAME can only ever name a file directly inside its folder: an adapter folder is flat."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def checked_listing(md5: str, entries: object) -> list[dict[str, str]]:
    """A .dir object's parsed entries, each a plain file name with a file hash; IntegrityError otherwise.

    Whoever writes a remote also computes the listing's hash, so its names are checked as untrusted paths before
    anything is written from them.
    """
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise IntegrityError(f"object {md5} is not a list of files; the remote that sent it is not trustworthy")
    names = [e.get("relpath") for e in entries]
    for entry, name in zip(entries, names, strict=True):
        if not plain_file_name(name):
            raise IntegrityError(
                f"object {md5} names a file {name!r}, which would be written outside its adapter folder; "
                "the remote that sent it is not trustworthy"
            )
        if not isinstance(entry.get("md5"), str) or not _FILE_MD5.fullmatch(entry["md5"]):
            raise IntegrityError(f"object {md5} gives {name!r} the hash {entry.get('md5')!r}, which is not an MD5")
    if len(set(names)) != len(names):
        raise IntegrityError(f"object {md5} names one file twice; the remote that sent it is not trustworthy")
    return [{"relpath": e["relpath"], "md5": e["md5"]} for e in entries]


def refuse_links(root: Path, path: Path, entries: bool = False) -> None:
    """Refuse PATH (inside ROOT) when it, a folder between ROOT and it, or (ENTRIES) a file or folder directly
    in it is a symbolic link: a link committed by whoever pushed is never followed out of the repository."""
    parts = path.relative_to(root).parts
    steps = [Path(*parts[:depth]) for depth in range(1, len(parts) + 1)]
    if entries and (root / path).is_dir():
        steps += [Path(entry.path).relative_to(root) for entry in os.scandir(root / path) if entry.is_symlink()]
    for step in steps:
        if (root / step).is_symlink():
            raise RegistryError(
                f"{step} is a symbolic link; the registry never follows links out of the repository: "
                f"remove it (`git rm {step}`) and run the command again."
            )


PROGRESS = True
"""Progress bars on stderr when it is a terminal; commands writing --json turn them off."""
_BIG = 64 << 20  # bytes: a file this large takes about a second to hash or copy


def progress_shown() -> bool:
    """Whether a person watches stderr (a terminal) and the command did not turn progress off."""
    return PROGRESS and sys.stderr.isatty()


def _bar(desc: str, total: int, unit: str = "B") -> Any:
    """A tqdm bar on stderr for a person watching a long step (bytes of big files, or files); else a silent one."""
    from tqdm import tqdm

    quiet = not progress_shown() or (unit == "B" and total < _BIG)
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False, disable=quiet)


def file_md5(path: Path, bar: Any = None) -> str:
    """MD5 of a file, as DVC addresses its objects (BAR, if given, advances by the bytes read)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            if bar is not None:
                bar.update(len(block))
    return digest.hexdigest()


def _dvc_repo_class() -> type[Repo]:
    """DVC's Repo, imported on first use; importing dvc sets its logger to INFO, which we quieten."""
    from dvc.repo import Repo

    # DVC's own messages would repeat what our commands print, or say it in DVC's terms.
    for name in ("dvc", "dvc_data", "dvc_objects"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # ... but its progress bars (hashing and copying in `add` and checkouts) help a person at a terminal.
    logging.getLogger("dvc.progress").setLevel(logging.INFO if progress_shown() else logging.CRITICAL)
    return Repo


@contextmanager
def _repo(root: Path) -> Iterator[Repo]:
    """DVC's Repo at ROOT, closed afterwards."""
    _cache_files(root)  # refuses a cache the committed config moved out of the repository
    repo = _dvc_repo_class()(str(root))
    try:
        yield repo
    finally:
        repo.close()


@contextmanager
def opened(root: Path) -> Iterator[Store]:
    """The DVC store of the repository at ROOT, closed afterwards."""
    objects = Store(root)
    try:
        yield objects
    finally:
        objects.close()


def _config(root: Path, names: tuple[str, ...] = ("config", "config.local")) -> dict[str, Any]:
    """DVC's committed and local config, merged, read without importing DVC (a command's start stays fast)."""
    from configobj import ConfigObj

    merged: dict[str, Any] = {}
    for name in names:
        path = root / ".dvc" / name
        if path.is_file():
            for section, values in ConfigObj(str(path)).items():
                merged.setdefault(section, {}).update(values)
    return merged


def _cache_files(root: Path) -> Path:
    """Where the local cache keeps file objects; a committed cache.dir outside the repository is refused.

    The committed config comes from whoever last pushed: it may not move this clone's writes elsewhere on disk.
    The local config is this machine's own, so a cache placed there (`dvc cache dir --local`) is trusted.
    """
    cache = root / ".dvc" / "cache"
    local = (_config(root, ("config.local",)).get("cache") or {}).get("dir")
    committed = (_config(root, ("config",)).get("cache") or {}).get("dir")
    if local:
        cache = root / ".dvc" / local
    elif committed:
        cache = root / ".dvc" / committed
        if not cache.resolve().is_relative_to(root.resolve()):
            raise RegistryError(
                f"The committed .dvc/config puts the DVC cache at {committed}, outside this repository; if you "
                f"trust it, run `dvc cache dir --local {cache.resolve()}` here, else remove it from .dvc/config."
            )
    if not local and cache.is_relative_to(root):
        refuse_links(root, cache)  # a committed link in place of .dvc/cache moves it as well
    return cache / "files" / "md5"


def init(root: Path) -> None:
    """Initialise DVC in a git work tree (no-op when .dvc exists)."""
    if (root / ".dvc").is_dir():
        return
    _dvc_repo_class().init(str(root)).close()


def track(root: Path, relpath: str) -> None:
    """`dvc add` a folder: its files go into the cache, a pointer file and a .gitignore entry beside it."""
    from dvc.exceptions import DvcException

    try:
        with _repo(root) as repo, _stored(_cache_files(root), local_only=False):
            repo.add(str(root / relpath))  # absolute: DVC resolves relative targets against the process's cwd
    except DvcException as exc:  # what DVC refuses here is the repository's own files (dvc.yaml, .dvc/config)
        raise RegistryError(f"DVC cannot track {relpath}: {first_line(exc)}; fix that and run again.") from None


# Errors that only writing to this machine's disk gives: a download failing so is the disk's fault, not the remote's.
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


class _Failures(logging.Handler):
    """Collects the OSErrors DVC logs while it goes on past a file it could not copy."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[OSError] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError):
            self.errors.append(exc)


@contextmanager
def _stored(files: Path, local_only: bool) -> Iterator[None]:
    """Run a DVC copy into the local cache at FILES; a file it failed to write is one line with its real cause.

    DVC logs such a failure and carries on, so without this a full disk looks like success (or, later, like a
    remote that lost the file). LOCAL_ONLY: only errors of this disk count (a download's other failures are the
    remote's, found when the files are verified). Partial copies left in the cache are removed.
    """
    failures = _Failures()
    loggers = [logging.getLogger(name) for name in ("dvc_data", "dvc_objects")]
    saved = [(logger.handlers, logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:  # ours alone: DVC's own handler would print each failure as well
        logger.handlers, logger.level, logger.propagate = [failures], logging.ERROR, False
    try:
        yield
    finally:
        for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            logger.handlers, logger.level, logger.propagate = handlers, level, propagate
    errors = [e for e in failures.errors if not local_only or e.errno in _DISK_ERRORS]
    if errors:
        for partial in files.glob("*/.*.tmp"):  # DVC copies to a hidden temp file, then renames it
            partial.unlink(missing_ok=True)
        cause, where = errors[0].strerror or type(errors[0]).__name__, files.parent.parent
        raise RegistryError(f"Adapter files could not be stored in the DVC cache at {where}: {cause}; nothing changed.")


def configure_remote(root: Path, name: str, url: str, options: dict[str, str], default: bool) -> None:
    """Add or replace a DVC remote in the committed config; DEFAULT makes it the one push and pull use."""
    with _repo(root) as repo, repo.config.edit("repo") as conf:
        conf["remote"][name] = {"url": url, **options}
        if default:
            conf["core"]["remote"] = name


def remove_remote(root: Path, name: str) -> None:
    """Drop DVC remote NAME from the committed config (and as the default)."""
    with _repo(root) as repo, repo.config.edit("repo") as conf:
        conf["remote"].pop(name, None)
        if conf["core"].get("remote") == name:
            del conf["core"]["remote"]


def remotes(root: Path) -> tuple[dict[str, dict[str, Any]], str | None]:
    """The DVC remotes and the default one."""
    conf = _config(root)
    found = {}
    for section, values in conf.items():
        match = re.fullmatch(r'remote\s+"(.+)"', section)
        if match:
            found[match[1]] = dict(values)
    return found, (conf.get("core") or {}).get("remote")


def local_path(url: str) -> Path | None:
    """The folder a git URL names, or None for a network URL."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if not parsed.scheme and ":" not in url.split("/")[0]:
        return Path(url)
    return None


def default_dvc_url(git_url: str) -> str | None:
    """For a git remote in a local folder, its DVC store lives beside git's files in that folder."""
    path = local_path(git_url)
    return str(path.resolve() / "dvc") if path else None


def _hash_infos(md5s: Iterable[str]) -> list[Any]:
    from dvc_data.hashfile.hash_info import HashInfo

    return [HashInfo("md5", md5) for md5 in sorted(set(md5s))]


class Store:
    """DVC's view of one repository: its local object cache and its remotes. Nothing else touches DVC."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._opened: Repo | None = None
        self._files = _cache_files(root)
        self._listings: dict[str, list[dict[str, str]]] = {}
        self._verified: set[str] = set()
        """Folder objects whose files this command has hashed already: a pull checks, then writes, each once."""
        self._hashes: dict[str, list[Any]] | None = None
        self._hashes_dirty = False

    @property
    def _repo(self) -> Repo:
        """DVC itself, opened on first need: reading and checking the local cache does without it."""
        if self._opened is None:
            self._opened = _dvc_repo_class()(str(self._root))
        return self._opened

    @property
    def _cache(self) -> Any:
        return self._repo.cache.local

    def close(self) -> None:
        """Close DVC if it was opened, and keep what was learnt about workspace files."""
        if self._opened is not None:
            self._opened.close()
        if self._hashes_dirty:
            write_atomic(self._hashes_file, json.dumps(self._hashes))

    def _path(self, md5: str) -> Path:
        """Where the local cache keeps object MD5 (DVC 3's layout: files/md5/ab/cdef...)."""
        return self._files / md5[:2] / md5[2:]

    def _has(self, md5: str) -> bool:
        return self._path(md5).is_file()

    def listing(self, md5: str) -> list[dict[str, str]]:
        """The files of a .dir object in the local cache: [{'relpath', 'md5'}]; IntegrityError if absent or broken."""
        if md5 not in self._listings:
            self._listings[md5] = self._read_listing(md5)
        return self._listings[md5]

    def _read_listing(self, md5: str) -> list[dict[str, str]]:
        path = self._path(md5)
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"object {md5} is not in the local cache") from exc
        if file_md5(path) != md5.removesuffix(".dir"):
            path.unlink()
            raise IntegrityError(f"object {md5} in the local cache is corrupt and was removed")
        try:
            return checked_listing(md5, entries)
        except IntegrityError:
            path.unlink()  # never kept: the next fetch asks the remote again
            raise

    def missing_locally(self, md5: str) -> list[str]:
        """Files of a folder object that the local cache lacks (the folder object itself included)."""
        if not self._has(md5):
            return [md5]
        return [e["md5"] for e in self.listing(md5) if not self._has(e["md5"])]

    def verify(self, md5: str) -> list[dict[str, str]]:
        """Check every file of a folder object against its hash; a bad one is removed from the cache and reported."""
        entries = self.listing(md5)
        if md5 in self._verified:
            return entries
        paths = [self._path(entry["md5"]) for entry in entries]
        total = sum(p.stat().st_size for p in paths if p.exists())
        with _bar("Checking hashes", total) as bar:
            for entry, path in zip(entries, paths, strict=True):
                self._check_file(md5, entry, path, bar)
        self._verified.add(md5)
        return entries

    def _check_file(self, md5: str, entry: dict[str, str], path: Path, bar: Any) -> None:
        """One file of folder object MD5 against its hash; a bad one is removed and reported."""
        if not path.exists():
            raise IntegrityError(f"{entry['relpath']} ({entry['md5']}) is missing")
        if file_md5(path, bar) != entry["md5"]:
            # Drop both so the next pull fetches them again instead of trusting the folder object.
            path.unlink()
            self._path(md5).unlink(missing_ok=True)
            self._listings.pop(md5, None)
            raise IntegrityError(f"{entry['relpath']} does not match its hash {entry['md5']} (corrupt copy removed)")

    def _transfer(self, direction: str, md5s: Iterable[str], remote: str | None) -> int:
        """Copy objects to ("push") or from ("pull") REMOTE, skipping those already there; returns how many moved.

        No remote index: DVC's cached list of remote contents would hide objects the remote has lost since.
        """
        from dvc_data.callbacks import TqdmCallback
        from dvc_data.hashfile.transfer import transfer
        from fsspec.callbacks import DEFAULT_CALLBACK

        wanted = _hash_infos(md5s)
        if not wanted:
            return 0
        try:
            odb = self._repo.cloud.get_remote_odb(remote, direction)
            cache = self._cache
            source, dest = (cache, odb) if direction == "push" else (odb, cache)
            verb = "Uploading" if direction == "push" else "Downloading"
            with (
                _bar(f"{verb} adapter files", len(wanted), unit="file") as bar,
                _stored(self._files, local_only=True) if direction == "pull" else nullcontext(),
            ):
                callback = TqdmCallback(progress_bar=bar) if not bar.disable else DEFAULT_CALLBACK
                result = transfer(source, dest, wanted, jobs=odb.fs.jobs, cache_odb=cache, callback=callback)
        except RegistryError:
            raise
        except Exception as exc:  # DVC raises many unrelated types for one cause: the remote said no
            raise RemoteError(f"{direction} of adapter files failed: {first_line(exc)}") from exc
        if result.failed and direction == "push":
            raise RemoteError(f"{len(result.failed)} adapter files could not be uploaded; run the push again.")
        return len(result.transferred)  # a failed download shows up as a missing file when verified

    def push(self, md5s: Iterable[str], remote: str | None) -> int:
        """Upload folder objects with their files that REMOTE lacks; returns files moved.

        Files go first and each folder object last, so a remote that has a folder object has all its files.
        """
        md5s = sorted(m for m in set(md5s) if self._has(m))
        files = {entry["md5"] for md5 in md5s for entry in self.listing(md5)}
        return self._transfer("push", files, remote) + self._transfer("push", md5s, remote)

    def fetch(self, md5s: Iterable[str], remote: str | None) -> int:
        """Download folder objects and their files into the local cache; returns files moved."""
        md5s = sorted(set(md5s))
        moved = self._transfer("pull", [m for m in md5s if not self._has(m)], remote)
        files = {entry["md5"] for md5 in md5s if self._has(md5) for entry in self.listing(md5)}
        return moved + self._transfer("pull", [f for f in files if not self._has(f)], remote)

    def remote_missing(self, md5s: Iterable[str], remote: str | None) -> set[str]:
        """Which of these folder objects REMOTE lacks, whole or in part (files known from the local cache)."""
        md5s = sorted(set(md5s))
        members = {md5: [e["md5"] for e in self.listing(md5)] if self._has(md5) else [] for md5 in md5s}
        every = {*md5s, *(f for files in members.values() for f in files)}
        found, default = remotes(self._root)
        folder = local_path((found.get(remote or default or "") or {}).get("url", "s3://"))
        if folder is not None:  # a folder remote is read as one, without starting DVC
            files = (self._root / ".dvc" / folder if not folder.is_absolute() else folder) / "files" / "md5"
            absent = {md5 for md5 in every if not (files / md5[:2] / md5[2:]).is_file()}
        else:
            from dvc_data.hashfile.status import compare_status

            try:
                status = compare_status(
                    self._cache,
                    self._repo.cloud.get_remote_odb(remote, "status"),
                    _hash_infos(every),
                    check_deleted=False,
                )
            except Exception as exc:  # as in _transfer
                raise RemoteError(f"checking the DVC remote failed: {first_line(exc)}") from exc
            absent = {h.value for h in status.new | status.missing}
        return {md5 for md5, files in members.items() if md5 in absent or absent.intersection(files)}

    def _odb(self, on_remote: bool, remote: str | None) -> Any:
        """The local cache, or REMOTE's object store (None: the default remote)."""
        if not on_remote:
            return self._cache
        try:
            return self._repo.cloud.get_remote_odb(remote, "push")
        except Exception as exc:  # as in _transfer
            raise RemoteError(f"opening the DVC remote failed: {first_line(exc)}") from exc

    def audit(self, md5: str, on_remote: bool = False, remote: str | None = None) -> list[tuple[str, str, str]]:
        """(file, object, "missing" or "corrupt") for each bad copy of a folder object's files, here or on REMOTE.

        Every byte is read and hashed, so this finds what an existence check cannot: a copy that rotted.
        """
        odb = self._odb(on_remote, remote)
        try:
            if _object_md5(odb, md5) != md5.removesuffix(".dir"):
                return [("file list", md5, "corrupt" if odb.exists(md5) else "missing")]
            with odb.fs.open(odb.oid_to_path(md5), mode="rb") as handle:
                entries = checked_listing(md5, json.loads(handle.read()))
            return [
                (e["relpath"], e["md5"], "corrupt" if odb.exists(e["md5"]) else "missing")
                for e in entries
                if _object_md5(odb, e["md5"]) != e["md5"]
            ]
        except (OSError, ValueError) as exc:
            if not on_remote:  # this disk's fault, not a remote's
                raise RegistryError(f"Reading the local DVC cache failed: {first_line(exc)}.") from exc
            raise RemoteError(f"reading adapter files failed: {first_line(exc)}") from exc

    def discard(self, md5s: Iterable[str], on_remote: bool = False, remote: str | None = None) -> None:
        """Delete these (corrupt) objects here or on REMOTE, so the next transfer copies them again."""
        odb = self._odb(on_remote, remote)
        if not on_remote:
            self._verified.clear()  # a folder checked earlier may hold one of these files
        for md5 in set(md5s):
            self._listings.pop(md5, None)
            if odb.exists(md5):
                odb.delete(md5)

    def materialize(self, md5: str, dest: Path) -> None:
        """Write a verified copy of a folder object to DEST; DEST appears only when complete."""
        entries = self.verify(md5)
        staging = dest.parent / f".{dest.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            sources = [self._path(entry["md5"]) for entry in entries]
            with _bar(f"Writing {dest.name}", sum(p.stat().st_size for p in sources)) as bar:
                for entry, source in zip(entries, sources, strict=True):
                    shutil.copyfile(source, staging / entry["relpath"])  # a plain name (checked_listing): flat
                    bar.update(source.stat().st_size)
            os.replace(staging, dest)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError):  # a full or read-only disk here: one line, not a traceback
                raise RegistryError(f"Writing {dest} failed: {exc.strerror or exc}; nothing was changed.") from None
            raise

    def read(self, md5: str, relpath: str) -> bytes | None:
        """One file of a folder object from the local cache, or None when the folder has no such file."""
        for entry in self.listing(md5):
            if entry["relpath"] == relpath:
                return self._path(entry["md5"]).read_bytes()
        return None

    def changed(self, md5: str, folder: Path) -> list[str]:
        """Files of FOLDER that differ from folder object MD5: edited, missing or added.

        A file whose size, modification time and inode are as when last hashed is not read again.
        """
        if folder.absolute().is_relative_to(self._root):  # a workspace folder, perhaps linked by a merge just now
            refuse_links(self._root, folder.absolute())
        expected = {e["relpath"]: e["md5"] for e in self.listing(md5)}
        # A link inside is a change, never read: its target may be anywhere. os.walk, not rglob: a status of
        # hundreds of folders spent most of its time making rglob's paths.
        present = {}
        for top, dirs, files in os.walk(folder):
            under = os.path.relpath(top, folder)
            for name in [*dirs, *files]:
                path = Path(top, name)
                if path.is_symlink() or path.is_file():
                    present[name if under == "." else f"{under}/{name}"] = path
        changed = []
        for relpath in sorted(set(expected) | set(present)):
            if (
                relpath in expected
                and relpath in present
                and not present[relpath].is_symlink()
                and self._workspace_md5(present[relpath]) == expected[relpath]
            ):
                continue
            changed.append(relpath)
        return changed

    @property
    def _hashes_file(self) -> Path:
        return self._root / ".dvc" / "tmp" / "adapters-hashes.json"  # DVC's own tmp/ is never committed

    def _workspace_md5(self, path: Path, known: str | None = None) -> str:
        """The MD5 of a workspace file, from the stat-keyed record when the file is unchanged (KNOWN: just written)."""
        if self._hashes is None:
            try:
                self._hashes = json.loads(self._hashes_file.read_text())
            except (OSError, ValueError):
                self._hashes = {}
        stat = path.stat()
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        record = self._hashes.get(str(path))
        if known is None and record and record[:3] == signature:
            return record[3]
        md5 = known or file_md5(path)
        self._hashes[str(path)] = [*signature, md5]
        self._hashes_dirty = True
        return md5

    def place(self, md5: str, folder: Path) -> None:
        """Make FOLDER hold exactly folder object MD5 (verified), swapped in whole: a workspace checkout of one adapter.

        Our own copy rather than DVC's checkout, which reads every pointer file of the repository first.
        """
        refuse_links(self._root, folder)
        fresh = folder.parent / f".{folder.name}.incoming"
        shutil.rmtree(fresh, ignore_errors=True)
        self.materialize(md5, fresh)
        old = folder.parent / f".{folder.name}.outgoing"
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        fresh.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
        for entry in self.listing(md5):  # written from verified objects: record their hashes, unread
            self._workspace_md5(folder / entry["relpath"], known=entry["md5"])


def _object_md5(odb: Any, md5: str) -> str | None:
    """The MD5 of an object's bytes as the store holds them (read in blocks), or None when it lacks it."""
    digest = hashlib.md5()
    try:
        with odb.fs.open(odb.oid_to_path(md5), mode="rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()
