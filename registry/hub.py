"""The Hugging Face Hub: publish a registry version with its model card, register a Hub revision as a version."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.core.base import HUB_ID
from adapterctl.core.cache import utc
from adapterctl.core.hashing import SHA256, sha256_file
from adapterctl.registry import folder, importing, store
from adapterctl.registry.card import METHODS, card_data, peft_snippet, precision_section, render
from adapterctl.core.errors import (
    AuthError,
    Conflict,
    IntegrityError,
    InvalidName,
    NotFound,
    RegistryError,
    RemoteError,
)
from adapterctl.registry.folder import CARD, LINEAGE, InvalidAdapter
from adapterctl.registry.names import Ref, check_name
from adapterctl.registry.refs import AdapterVersion
from adapterctl.registry.repo import Registry

if TYPE_CHECKING:
    from huggingface_hub import GitRefs, HfApi

DEFAULT_ENDPOINT = "https://huggingface.co"
# Beside the version's files on the Hub: their names and sha256s, and the card the version was registered with
# (README.md there is the Hub card), so a pull restores the version byte for byte.
MANIFEST = "adapters.json"
VERSION_CARD = "version_card.md"
_TOKEN_HELP = "set HF_TOKEN or run `hf auth login`"


def endpoint() -> str:
    """The Hub to talk to: $HF_ENDPOINT, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


@dataclass
class Published:
    """What `adapters hub push` did: which version, where it is on the Hub, and whether anything changed there."""

    ref: str
    repo_id: str
    tag: str
    commit: str
    url: str
    committed: bool
    branches: list[str] = field(default_factory=list)


@dataclass
class Pulled:
    """What `adapters hub pull` did: the local version and the Hub commit it holds."""

    version: AdapterVersion
    repo_id: str
    commit: str
    registered: bool
    left_out: list[str] = field(default_factory=list)  # one line per file of a foreign adapter not registered


def push(registry: Registry, ref: str, repo_id: str, private: bool = False, stages: bool = False) -> Published:
    """Publish version REF to Hub repository REPO_ID: one commit (files, card, manifest), then its tag vX.Y.Z."""
    _check_repo_id(repo_id)
    state = registry.state()
    version = state.resolve(Ref.parse(ref))
    held = state.adapter(version.name).stages_of(version.version) if stages else []
    token = _token()
    tag = str(version.version)
    with tempfile.TemporaryDirectory(prefix="adapters-hub-") as tmp:
        files = Path(tmp) / "version"
        registry.checkout(version.ref, files)
        manifest = _manifest(version, files)
        card = model_card(version, registry.meta(version), json.loads((files / LINEAGE).read_text()), repo_id)
        api = _api(token)
        with _hub_errors(repo_id, write=True), _progress():
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.model_info(repo_id)
            if private and not info.private:
                raise Conflict(f"{repo_id} already exists and is public; --private only applies to a new repository.")
            refs = api.list_repo_refs(repo_id)
            tagged = {r.name: r.target_commit for r in refs.tags}
            if tag in tagged:
                commit = tagged[tag]
                if (_hub_manifest(api, repo_id, commit, tmp) or {}).get("files") != manifest["files"]:
                    raise Conflict(
                        f"{repo_id} already has {tag} with other files, and versions are immutable; "
                        "push another version or to another --repo-id."
                    )
            else:
                commit = _commit(api, repo_id, info.sha, files, card, manifest, version, tmp)
                # Only once the commit is on the Hub does a tag name it.
                api.create_tag(repo_id, tag=tag, revision=commit, tag_message=f"{version.ref}: {version.message}")
            branches = _point_branches(api, repo_id, refs, held, commit)
    return Published(
        version.ref, repo_id, tag, commit, f"{endpoint()}/{repo_id}/tree/{tag}", tag not in tagged, branches
    )


def pull(
    registry: Registry,
    source: str,
    name: str,
    version: str | None = None,
    base: str | None = None,
    allow_unservable: bool = False,
) -> Pulled:
    """Register Hub repository SOURCE (ORG/NAME[@REVISION]) as a new version of NAME once its files check out.

    BASE names the base model of an adapter trained elsewhere (no lineage.json), as for `adapters add --base`."""
    repo_id, _, revision = source.partition("@")
    revision = revision or "main"
    _check_repo_id(repo_id)
    check_name(name)
    label = f"{repo_id}@{revision}"
    api = _api(None)  # anonymous unless HF_TOKEN or a login gives a token: public repositories need none
    with tempfile.TemporaryDirectory(prefix="adapters-hub-") as tmp, _progress():
        with _hub_errors(repo_id, revision):
            commit = api.model_info(repo_id, revision=revision).sha
            known = _registered(registry, name, repo_id, commit)
            if known:
                return Pulled(known, repo_id, commit, registered=False)
            manifest = _hub_manifest(api, repo_id, commit, tmp)
            wanted = [entry["path"] for entry in manifest["files"].values()] if manifest else None  # not others' files
            snapshot = Path(api.snapshot_download(repo_id, revision=commit, cache_dir=tmp, allow_patterns=wanted))
        adapter = Path(tmp) / "adapter"
        published_as = _restore(snapshot, manifest, adapter, label)
        with importing.staged_if_foreign(adapter, base, name, label) as imported:
            adapter = imported.path if imported else adapter
            # Names the Hub copy; `add` reads the weights.
            folder.check(adapter, shown=Path(label), scan=False, allow_unservable=allow_unservable)
            _check_base(adapter, label)
            provenance = {"repo_id": repo_id, "revision": revision, "commit": commit, **published_as}
            added = registry.add(
                name,
                adapter,
                version=version,
                message=f"Pulled {repo_id}@{commit[:8]} from the Hub",
                meta={"hub": provenance, **({"imported": imported.provenance} if imported else {})},
                allow_unservable=allow_unservable,
            )
    return Pulled(added, repo_id, commit, registered=True, left_out=imported.notes() if imported else [])


def model_card(version: AdapterVersion, meta: dict[str, Any], lineage: dict[str, Any], repo_id: str) -> str:
    """The Hub card of VERSION: Hub metadata, metrics, lineage, and how to load it with PEFT and with adapters."""
    base, dataset = lineage.get("base_model") or {}, lineage.get("dataset") or {}
    metrics, hyper = meta.get("metrics") or {}, lineage.get("hyperparameters") or {}
    method = lineage.get("method") or "lora"
    # The Hub accepts only a Hub id as base_model; a local base is still named in the text.
    data = card_data(version.name, method, base.get("hub_id"), dataset.get("file"), metrics.get("eval_loss_after"))
    base_name, tag = meta["base_model"], str(version.version)
    rows = "".join(f"| {key} | {_value(value)} |\n" for key, value in metrics.items())
    table = f"| metric | value |\n|---|---|\n{rows}\n" if rows else ""
    lineage_lines = [f"- base model: `{base_name}`, fingerprint `{meta['base_fingerprint']}` (its safetensors weights)"]
    if dataset:
        lineage_lines.append(f"- dataset: `{dataset.get('file')}`, sha256 `{dataset.get('sha256')}`")
    if hyper:
        lineage_lines.append("- hyper-parameters: " + ", ".join(f"{k} {_value(v)}" for k, v in hyper.items()))
    if (lineage.get("git") or {}).get("commit"):
        lineage_lines.append(f"- training code commit: `{lineage['git']['commit']}`")
    if lineage.get("versions"):
        lineage_lines.append("- libraries: " + ", ".join(f"{k} {v}" for k, v in lineage["versions"].items() if v))
    lineage_lines.append(
        f"- registry: `{version.ref}`, registered by {version.author} on {utc(version.date)} "
        f"(registry commit `{version.commit}`)"
    )
    body = f"""
# {version.name} {tag}

A {METHODS.get(method, method)} adapter for `{base_name}` (rank {meta.get("rank")}, alpha {meta.get("alpha")},
target modules {_value(meta.get("target_modules"))}): version {tag} of `{version.name}` in an adapter registry.

{table}{precision_section(meta.get("precision"), meta.get("fidelity"))}
## Use it

With PEFT:

{peft_snippet(base.get("hub_id") or base_name, repo_id, tag)}

With `adapters`: register it as a local version, then serve it beside other adapters on one base model;
requests that name `{version.name}` as their `model` use it.

```bash
adapters hub pull {repo_id}@{tag} --as {version.name}
adapters serve
```

## Lineage

{chr(10).join(lineage_lines)}

The full record is in `{LINEAGE}`. `{MANIFEST}` lists every file of this version with its sha256 and
`{VERSION_CARD}` is the card it was registered with; `adapters hub pull` checks them and restores the version
byte for byte.
"""
    return render(data, body)


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _api(token: str | None) -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token, library_name="adapterctl")


def _token() -> str:
    """The token pushes are made with; AuthError when there is none."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise AuthError(f"Pushing to the Hub needs a token with write access: {_TOKEN_HELP}.")
    return token


def _check_repo_id(repo_id: str) -> None:
    if not HUB_ID.fullmatch(repo_id):
        raise _not_a_repo_id(repo_id)


def _not_a_repo_id(repo_id: str) -> InvalidName:
    return InvalidName(f"{repo_id!r} is not a Hub repository id; use ORG/NAME.")


@contextmanager
def _progress() -> Iterator[None]:
    """The Hub client's progress bars only where the registry shows its own: on a terminal, never into a pipe."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = not store.progress_shown() and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet:
            enable_progress_bars()


@contextmanager
def _hub_errors(repo_id: str, revision: str | None = None, write: bool = False) -> Iterator[None]:
    """Turn the Hub client's exceptions into one line each, naming the repository and revision."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    http_error = HfHubHTTPError.__bases__[0]  # the base error of the client's HTTP library (httpx or httpx2)
    try:
        yield
    except RevisionNotFoundError:
        raise NotFound(
            f"{repo_id} has no revision {revision!r} on the Hub (a branch, a tag vX.Y.Z or a commit)."
        ) from None
    except RepositoryNotFoundError:
        raise NotFound(
            f"No Hub repository {repo_id} at {endpoint()}, or it is private and the token cannot read it "
            f"({_TOKEN_HELP})."
        ) from None
    except HfHubHTTPError as exc:
        raise _refused(exc, repo_id, write) from None
    except HFValidationError:
        raise _not_a_repo_id(repo_id) from None
    except OfflineModeIsEnabled:
        raise RemoteError("HF_HUB_OFFLINE is set, so the Hub is not contacted; unset it to push or pull.") from None
    except (http_error, LocalEntryNotFoundError) as exc:
        reason = " ".join(str(exc).split()[:12]) or type(exc).__name__
        raise RemoteError(
            f"Cannot reach the Hub at {endpoint()} ({reason}); check the network or HF_ENDPOINT."
        ) from None


def _refused(exc: Any, repo_id: str, write: bool) -> RemoteError:
    """The project error for an HTTP error status the Hub answered with."""
    status = exc.response.status_code
    said = " ".join(str(exc.server_message or exc.response.reason_phrase).split())
    if status == 401:
        return AuthError(f"The Hub at {endpoint()} refused the token (401 Unauthorized: {said}); {_TOKEN_HELP}.")
    if status == 403:
        access = "write" if write else "read"
        return AuthError(
            f"The token may not {access} {repo_id} (403 Forbidden: {said}); use a token with {access} access to it."
        )
    if status in (409, 412):
        return Conflict(f"{repo_id} changed on the Hub during the push ({said}); run it again.")
    return RemoteError(f"The Hub at {endpoint()} answered {status} for {repo_id}: {said}.")


def _manifest(version: AdapterVersion, files: Path) -> dict[str, Any]:
    """VERSION's files as the Hub copy holds them: {name: {path on the Hub, sha256}}."""
    entries = {}
    for path in sorted(files.iterdir()):
        if path.name in (MANIFEST, VERSION_CARD):
            raise RegistryError(f"{version.ref} holds a file named {path.name}, a name its Hub copy needs; rename it.")
        entries[path.name] = {"path": VERSION_CARD if path.name == CARD else path.name, "sha256": sha256_file(path)}
    return {"adapter": version.name, "version": str(version.version)[1:], "files": entries}


def _read_manifest(path: Path, label: str) -> dict[str, Any]:
    """A manifest read from the Hub, checked: plain file names, a sha256 each."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        data = None
    files = data.get("files") if isinstance(data, dict) else None
    if (
        not isinstance(files, dict)
        or not files
        or not all(
            _plain(name)
            and isinstance(entry, dict)
            and _plain(entry.get("path"))
            and SHA256.fullmatch(str(entry.get("sha256")))
            for name, entry in files.items()
        )
    ):
        raise InvalidAdapter(f"{label}: {MANIFEST} is not a valid list of files; nothing was registered.")
    return data


def _plain(name: Any) -> bool:
    """True for a plain file name: no folder, no leading dot, so it can never leave the adapter folder."""
    return isinstance(name, str) and name == Path(name).name and not name.startswith(".")


def _hub_manifest(api: HfApi, repo_id: str, revision: str, cache: str) -> dict[str, Any] | None:
    """The manifest at REVISION of REPO_ID, or None when it has none."""
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        path = api.hf_hub_download(repo_id, MANIFEST, revision=revision, cache_dir=cache)
    except RemoteEntryNotFoundError:
        return None
    return _read_manifest(Path(path), f"{repo_id}@{revision}")


def _commit(
    api: HfApi,
    repo_id: str,
    head: str,
    files: Path,
    card: str,
    manifest: dict[str, Any],
    version: AdapterVersion,
    cache: str,
) -> str:
    """Commit the version's files, card and manifest on main; returns that commit, or HEAD when it holds them."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    previous = _hub_manifest(api, repo_id, head, cache)
    if previous == manifest:
        return head  # an earlier push committed this version and stopped before its tag
    ours = {entry["path"] for entry in manifest["files"].values()} | {CARD, MANIFEST}
    # Files an earlier version put there and this one lacks go; files others added stay.
    stale = {entry["path"] for entry in (previous or {}).get("files", {}).values()} - ours
    operations: list[Any] = [CommitOperationAdd(e["path"], files / name) for name, e in manifest["files"].items()]
    operations += [
        CommitOperationAdd(CARD, card.encode()),
        CommitOperationAdd(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode()),
    ]
    operations += [CommitOperationDelete(path) for path in sorted(stale)]
    info = api.create_commit(
        repo_id,
        operations,
        commit_message=f"Upload {version.ref}",
        commit_description=version.message,
        parent_commit=head,  # a concurrent push makes this one fail instead of mixing files
    )
    return info.oid


def _point_branches(api: HfApi, repo_id: str, refs: GitRefs, stages: list[str], commit: str) -> list[str]:
    """Point a branch per stage at COMMIT; returns the branches that changed."""
    heads = {r.name: r.target_commit for r in refs.branches}
    moved = []
    for stage in stages:
        if heads.get(stage) == commit:
            continue
        if stage in heads:
            api.delete_branch(repo_id, branch=stage)  # the Hub cannot move a branch; it is re-created
        api.create_branch(repo_id, branch=stage, revision=commit)
        moved.append(stage)
    return moved


def _registered(registry: Registry, name: str, repo_id: str, commit: str) -> AdapterVersion | None:
    """The version of NAME already pulled from that Hub commit, if any."""
    adapter = registry.state().adapters.get(name)
    if adapter is None:
        return None
    for version, meta in zip(adapter.versions, registry.metas(adapter.versions), strict=True):
        hub = meta.get("hub") or {}
        if hub.get("repo_id") == repo_id and hub.get("commit") == commit:
            return version
    return None


def _restore(snapshot: Path, manifest: dict[str, Any] | None, dest: Path, label: str) -> dict[str, str]:
    """Write the version's files from a Hub SNAPSHOT into DEST, hashes checked; returns what it was published as."""
    dest.mkdir()
    if manifest is None:
        # Published by other tools: its files as they are, checked like any folder that is registered.
        for path in sorted(snapshot.iterdir()):
            if path.is_dir():
                raise InvalidAdapter(f"{label} holds a folder {path.name}/; an adapter is a flat folder of files.")
            if path.name != ".gitattributes":
                shutil.copyfile(path, dest / path.name)
        return {}
    for name, entry in manifest["files"].items():
        source = snapshot / entry["path"]
        if not source.is_file():
            raise IntegrityError(
                f"{label}: {MANIFEST} lists {entry['path']}, which is not there; nothing was registered."
            )
        shutil.copyfile(source, dest / name)
        if sha256_file(dest / name) != entry["sha256"]:
            raise IntegrityError(
                f"{label}: {entry['path']} does not match its sha256 in {MANIFEST}; nothing was registered."
            )
    if isinstance(manifest.get("adapter"), str) and isinstance(manifest.get("version"), str):
        return {"published_as": f"{manifest['adapter']}@v{manifest['version']}"}
    return {}


def _check_base(adapter: Path, label: str) -> None:
    """Refuse an adapter trained on other weights than the local base model of the same name, when there is one."""
    base = json.loads((adapter / LINEAGE).read_text())["base_model"]  # folder.check has parsed it
    theirs, ours = base["fingerprint"], _local_fingerprint(base)
    if ours and ours != theirs:
        raise InvalidAdapter(
            f"{label} was trained on {base.get('hub_id') or base.get('name')} with fingerprint {theirs[:19]}..., "
            f"but the local copy is {ours[:19]}...; it would load onto other weights. Nothing was registered."
        )


def _local_fingerprint(base: dict[str, Any]) -> str | None:
    """The fingerprint of the local copy of the base model lineage names: a cached model, or an absolute folder."""
    from adapterctl.core.base import cached_models, fingerprint

    names = {base.get("hub_id"), base.get("name")} - {None, ""}
    for model in cached_models():
        if names & {model.get("hub_id"), model.get("name")}:
            return model["fingerprint"]
    path = Path(str(base.get("name") or ""))
    if path.is_absolute() and path.is_dir() and any(path.glob("*.safetensors")):
        return fingerprint(path)
    return None
