"""What `adapters list / log / show / diff / status` report, as plain dicts (the --json output)."""

from __future__ import annotations

from typing import Any

from adapterctl.core.cache import utc
from adapterctl.core.errors import RemoteError
from adapterctl.core.precision import Precision
from adapterctl.registry import store
from adapterctl.registry.folder import CONFIG, LINEAGE
from adapterctl.registry.names import Ref, check_name
from adapterctl.registry.refs import AdapterVersion, State
from adapterctl.registry.remotes import resolve_remote
from adapterctl.registry.repo import Registry


def _version(version: AdapterVersion, state: State) -> dict[str, Any]:
    return {
        "ref": version.ref,
        "name": version.name,
        "version": str(version.version),
        "commit": version.commit,
        "date": utc(version.date),
        "author": version.author,
        "message": version.message,
        "stages": state.adapters[version.name].stages_of(version.version),
    }


def listing(registry: Registry) -> list[dict[str, Any]]:
    """One row per adapter: latest version, version count, stage heads."""
    state = registry.state()
    latest = registry.metas([adapter.latest for adapter in state.adapters.values()]) if state.adapters else []
    return [
        {
            "name": name,
            "latest": str(adapter.latest.version),
            "versions": len(adapter.versions),
            "stages": {stage: str(v.version) for stage, v in adapter.stages().items()},
            "updated": utc(adapter.last_date),
            "precision": Precision.from_lineage(meta.get("precision")).quantize,  # of the latest version
        }
        for (name, adapter), meta in zip(state.adapters.items(), latest, strict=True)
    ]


def log(registry: Registry, name: str | None, limit: int | None = None) -> dict[str, Any]:
    """Every version of NAME, or of every adapter (newest first, at most LIMIT), with metrics, and stage history."""
    state = registry.state()
    adapters = [state.adapter(check_name(name))] if name else list(state.adapters.values())
    versions = sorted((v for a in adapters for v in a.versions), key=lambda v: (v.date, v.version), reverse=True)
    versions = versions[:limit]
    rows = []
    for version, meta in zip(versions, registry.metas(versions), strict=True):
        rows.append(
            {**_version(version, state), "metrics": meta.get("metrics", {}), "base_model": meta.get("base_model")}
        )
    events = sorted((e for a in adapters for e in a.events), key=lambda e: (e.date, e.counter), reverse=True)
    history = [
        {
            "adapter": e.name,
            "stage": e.stage,
            "action": ("rollback" if e.rollback else "promote") if e.assign else "unassign",
            "version": str(e.version),
            "date": utc(e.date),
            "author": e.author,
            "tag": e.tag,
            "message": e.message,
        }
        for e in events[:limit]
    ]
    return {"name": name, "versions": rows, "stage_history": history}


def show(registry: Registry, ref: str) -> dict[str, Any]:
    """One version: who registered it and when, the stages it holds, and the summary recorded with it."""
    state = registry.state()
    version = state.resolve(Ref.parse(ref))
    return {**_version(version, state), "requested": ref, **registry.meta(version)}


DIFF_SECTIONS = ("config", "hyperparameters", "metrics", "lineage", "files")


def diff(registry: Registry, left: str, right: str) -> dict[str, Any]:
    """What differs between two versions: config, hyper-parameters, metrics, lineage, file hashes."""
    state = registry.state()
    sides = [state.resolve(Ref.parse(r)) for r in (left, right)]
    data = [registry.files(v) for v in sides]
    (files_a, docs_a), (files_b, docs_b) = data
    lineage_a, lineage_b = docs_a[LINEAGE], docs_b[LINEAGE]
    sections = {
        "config": _changes(docs_a[CONFIG], docs_b[CONFIG]),
        "hyperparameters": _changes(lineage_a.get("hyperparameters", {}), lineage_b.get("hyperparameters", {})),
        "metrics": _changes(lineage_a.get("metrics", {}), lineage_b.get("metrics", {})),
        "lineage": _changes(
            {k: v for k, v in lineage_a.items() if k not in ("hyperparameters", "metrics")},
            {k: v for k, v in lineage_b.items() if k not in ("hyperparameters", "metrics")},
        ),
        "files": _changes({f["relpath"]: f["md5"] for f in files_a}, {f["relpath"]: f["md5"] for f in files_b}),
    }
    return {"left": sides[0].ref, "right": sides[1].ref, **sections}


def _changes(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> dict[str, list[Any]]:
    """Keys whose values differ, flattened with dots: {key: [left, right]}."""
    out: dict[str, list[Any]] = {}
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            out.update(_changes(left, right, f"{prefix}{key}."))
        elif left != right:
            out[f"{prefix}{key}"] = [left, right]
    return out


def status(registry: Registry, remote: str | None) -> dict[str, Any]:
    """Unpushed versions, files missing here or on the remote, local edits; the remote "unknown" when unreachable."""
    state = registry.state()
    versions = [v for adapter in state.adapters.values() for v in adapter.versions]
    remote = resolve_remote(registry, remote)
    try:
        remote_refs: dict[str, str] | None = registry.git.remote_refs(remote)
    except RemoteError as exc:
        remote_refs, unreachable = None, str(exc)
    tags = {t.name for t in state.tags}
    pointers = dict(zip(versions, (md5 for _, md5 in registry.pointers(versions)), strict=True))
    here = dict(registry.tree_pointers("HEAD")) if registry.git.head() else {}
    with store.opened(registry.root) as objects:
        absent = {md5 for md5 in set(pointers.values()) if objects.missing_locally(md5)}
        local_missing = [v.ref for v, md5 in pointers.items() if md5 in absent]
        modified = [f for files in registry.local_changes(objects, here).values() for f in files]
        published = [(v, md5) for v, md5 in pointers.items() if f"refs/tags/{v.tag}" in (remote_refs or {})]
        gone = objects.remote_missing([md5 for _, md5 in published], remote) if published else set()
    data: dict[str, Any] = {
        "remote": remote,
        "remote_state": "known" if remote_refs is not None else "unknown",
        "unpushed_tags": [],
        "missing_locally": local_missing,
        "missing_on_remote": [v.ref for v, md5 in published if md5 in gone],
        "remote_only_tags": [],
        "modified": modified,
        "interrupted_pull": registry.pull_mark.exists(),
    }
    if remote_refs is None:
        data["remote_error"] = unreachable
        return data
    data["unpushed_tags"] = sorted(t for t in tags if f"refs/tags/{t}" not in remote_refs)
    data["remote_only_tags"] = sorted(
        r.removeprefix("refs/tags/")
        for r in remote_refs
        if r.startswith("refs/tags/") and r[10:] not in tags and not state.skipped.get(r[10:])
    )
    return data
