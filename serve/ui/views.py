"""What the console's registry pages show, as plain dicts for the templates: built on registry/report.py."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from adapterctl.core.errors import InvalidName, NotFound
from adapterctl.core.precision import QUANTIZE, Precision
from adapterctl.registry import report, store
from adapterctl.registry.folder import CARD, CONFIG, LINEAGE
from adapterctl.registry.names import Ref
from adapterctl.registry.git import Tag
from adapterctl.registry.refs import AdapterVersion, State
from adapterctl.registry.repo import Registry
from adapterctl.serve.errors import AdapterNotFound
from adapterctl.serve.catalog.fidelity import Fidelity

PAGE = 50  # rows per page: a registry of thousands of versions is cut server-side
LOSS_PLOT = "loss.png"
# CommonMark without raw HTML: a card's <script> is text; markdown-it also refuses javascript: and data: links.
_MARKDOWN = MarkdownIt("commonmark", {"html": False})
Allowed = Callable[[str], bool]


class Snapshots(Registry):
    """A registry read for pages: its state (every tag, a git call that grows with the registry) is read again only
    once a tag was written or deleted, which changes refs/tags or packed-refs; a page reads it several times."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._held: tuple[tuple[int, ...], State] | None = None

    def state(self, tags: list[Tag] | None = None) -> State:
        """The registry's state, as last read if no tag changed since."""
        if tags is not None:
            return super().state(tags)
        stamp = self._stamp()  # taken before the read: a tag written meanwhile makes the next call read again
        held = self._held
        if held is None or held[0] != stamp:
            held = self._held = (stamp, super().state())
        return held[1]

    def _stamp(self) -> tuple[int, ...]:
        stamp: list[int] = []
        for path in (self.git.git_dir / "refs" / "tags", self.git.git_dir / "packed-refs"):
            try:
                info = path.stat()
                stamp += [info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size]
            except FileNotFoundError:
                stamp += [0, 0, 0, 0]
        return tuple(stamp)


@dataclass(frozen=True)
class Page:
    """One page of rows and where it sits among all of them."""

    rows: list[Any]
    number: int
    pages: int
    total: int


def paginate(rows: list[Any], number: int) -> Page:
    """Page NUMBER (1-based, clamped) of ROWS."""
    pages = max(1, math.ceil(len(rows) / PAGE))
    number = min(max(1, number), pages)
    return Page(rows[(number - 1) * PAGE : number * PAGE], number, pages, len(rows))


def adapters(registry: Registry, allowed: Allowed, query: str, number: int) -> Page:
    """The adapters the caller may see whose name holds QUERY, with their stages and latest version."""
    rows = [row for row in report.listing(registry) if allowed(row["name"]) and query.lower() in row["name"].lower()]
    return paginate(rows, number)


def version_of(state: State, ref: str, allowed: Allowed) -> AdapterVersion:
    """The version REF means now; another tenant's adapter, or a malformed reference, is not found."""
    try:
        parsed = Ref.parse(ref)
        if not allowed(parsed.name):
            raise NotFound(ref)
        return state.resolve(parsed)
    except (InvalidName, NotFound):
        raise AdapterNotFound(f"The model {ref!r} does not exist or you do not have access to it.") from None


def adapter(registry: Registry, allowed: Allowed, name: str, number: int) -> dict[str, Any]:
    """One adapter: a page of its versions (newest first) with precision, fidelity and eval loss; its stage history."""
    state = registry.state()
    if name not in state.adapters or not allowed(name):
        raise AdapterNotFound(f"The model {name!r} does not exist or you do not have access to it.")
    data = report.log(registry, name, limit=number * PAGE)
    page = paginate(data["versions"], number)
    total = len(state.adapters[name].versions)
    page = Page(page.rows, page.number, max(1, math.ceil(total / PAGE)), total)
    by_ref = {v.ref: v for v in state.adapters[name].versions}
    metas = registry.metas([by_ref[row["ref"]] for row in page.rows]) if page.rows else []
    for row, meta in zip(page.rows, metas, strict=True):
        row["precision"] = Precision.from_lineage(meta.get("precision")).quantize
        row["fidelity"] = fidelity_classes(row["ref"], meta)
        row["eval_loss"] = (meta.get("metrics") or {}).get("eval_loss_after")  # what training ended with
        row["origin"] = origin(meta)[0]
    stages = {stage: v.ref for stage, v in state.adapters[name].stages().items()}
    return {"name": name, "versions": page, "stages": stages, "history": data["stage_history"]}


def fidelity_classes(ref: str, meta: dict[str, Any]) -> dict[str, str]:
    """The fidelity class of a version on each serving precision, judged as the server would (catalog/fidelity.py)."""
    trained = Precision.from_lineage(meta.get("precision"))
    dtype = trained.compute_dtype or "float32"
    return {q: Fidelity(Precision.of(q, dtype)).judge(ref, meta).fidelity_class for q in QUANTIZE}


def origin(meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Where a version came from: trained here, imported from another trainer, or the Hugging Face Hub."""
    if meta.get("hub"):
        return "Hugging Face Hub", meta["hub"] if isinstance(meta["hub"], dict) else {}
    if meta.get("imported"):
        return "imported", meta["imported"] if isinstance(meta["imported"], dict) else {}
    return "trained here", {}


def version(registry: Registry, allowed: Allowed, ref: str) -> dict[str, Any]:
    """One version: who/when, stages, lineage, files with sizes and hashes, model card, loss curve, origin."""
    state = registry.state()
    found = version_of(state, ref, allowed)
    shown = report.show(registry, found.ref)
    entries, docs = registry.files(found)  # fetched from the DVC remote when this clone lacks them
    md5 = store.dir_md5(registry.dvcfile(found))
    with store.opened(registry.root) as objects:
        files = [{**e, "size": len(objects.read(md5, e["relpath"]) or b"")} for e in entries]
        card = objects.read(md5, CARD)
        plot = objects.read(md5, LOSS_PLOT)
    kind, provenance = origin(shown)
    return {
        **shown,
        "requested": ref,
        "lineage": flatten(docs[LINEAGE]),
        "config": flatten(docs[CONFIG]),
        "files": files,
        "card": markdown(_without_front_matter(card.decode(errors="replace"))) if card else None,
        "loss_plot": f"data:image/png;base64,{base64.b64encode(plot).decode()}" if plot else None,
        "origin": kind,
        "provenance": flatten(provenance),
        "fidelity": fidelity_classes(found.ref, shown),
        "others": [v.ref for v in reversed(state.adapters[found.name].versions) if v.ref != found.ref][:PAGE],
    }


def diff(registry: Registry, allowed: Allowed, left: str, right: str) -> dict[str, Any]:
    """What differs between two versions, as `adapters diff` reports it."""
    state = registry.state()
    sides = [version_of(state, ref, allowed).ref for ref in (left, right)]
    return report.diff(registry, *sides)


def rollback_target(registry: Registry, allowed: Allowed, name: str, stage: str) -> dict[str, str]:
    """What `adapters rollback NAME --stage STAGE` would do: the version holding STAGE now and the one it returns to."""
    state = registry.state()
    if name not in state.adapters or not allowed(name):
        raise AdapterNotFound(f"The model {name!r} does not exist or you do not have access to it.")
    adapter = state.adapters[name]
    current, history = adapter.stages().get(stage), adapter.history(stage)
    if current is None or len(history) < 2:
        raise NotFound(f"{name}#{stage} has no earlier version to return to.")
    target = adapter.version(history[-2])
    assert target is not None
    return {"stage": stage, "now": current.ref, "to": target.ref}


def flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as (dotted key, value) rows, for a two-column table."""
    if not isinstance(data, dict):
        return [(prefix.rstrip("."), data)] if prefix else []
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            rows.extend(flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def markdown(text: str) -> str:
    """TEXT rendered as HTML with every raw HTML tag escaped."""
    return _MARKDOWN.render(text)


def _without_front_matter(text: str) -> str:
    """A model card without its YAML metadata block (shown elsewhere: lineage)."""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            return text[end + 4 :].lstrip("\n")
    return text
