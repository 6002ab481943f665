"""The console's routes: public page shells, the fragments and JSON they fetch with the caller's key, admin actions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from adapterctl.core.errors import AdaptersError, Conflict, InvalidName, NotFound
from adapterctl.registry.repo import Registry
from adapterctl.serve.catalog.versions import Catalog
from adapterctl.serve.api.dependencies import tenant_of
from adapterctl.serve.engines.base import Engine
from adapterctl.serve.errors import AdapterNotFound, BadRequest, Forbidden, ServeError, Unavailable
from adapterctl.serve.api.tenants import Tenant, Tenants
from adapterctl.serve.ui import live, views

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")  # autoescaping every .html template
PLAYGROUND_COLUMNS = 4  # versions or stages beside the base model
router = APIRouter(include_in_schema=False)


@dataclass
class Console:
    """What the console shows: a registry and its tenants; with a catalog and engine, the playground and live view.

    Pages read `pages`, which keeps the registry's state until a tag changes; actions go through `registry`, which
    reads it afresh under the registry's lock, as the CLI does."""

    registry: Registry
    tenants: Tenants
    catalog: Catalog | None = None
    engine: Engine | None = None
    pages: Registry = field(init=False)

    def __post_init__(self) -> None:
        self.pages = views.Snapshots(self.registry.root)


class Conflicting(ServeError):
    """An action the registry's current state refuses (the version already holds the stage)."""

    status = 409
    kind = "invalid_request_error"


def console(request: Request) -> Console:
    """The console this app serves."""
    return request.app.state.console


ConsoleDep = Annotated[Console, Depends(console)]
_bearer = HTTPBearer(auto_error=False)


def caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)], con: ConsoleDep
) -> Tenant:
    """The tenant whose key the request carries; Unauthorized without a valid one."""
    return tenant_of(request, credentials, con.tenants)


CallerDep = Annotated[Tenant, Depends(caller)]


def admin(tenant: CallerDep) -> Tenant:
    """The caller, if it holds the admin key (any caller in open mode); tenants never act on the registry."""
    if tenant.admin:
        return tenant
    raise Forbidden("This action needs the admin key.")


def json_only(request: Request) -> None:
    """Refuse an action not sent as JSON: HTML forms cannot send it, so no page elsewhere can post one."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise BadRequest("Console actions take a JSON body sent as Content-Type: application/json.")


AdminDep = Annotated[Tenant, Depends(admin)]


@contextlib.contextmanager
def _registry_errors() -> Iterator[None]:
    """Registry errors as the HTTP answers the rest of the API gives."""
    try:
        yield
    except ServeError:
        raise
    except NotFound as exc:
        raise AdapterNotFound(str(exc)) from None
    except InvalidName as exc:
        raise BadRequest(str(exc)) from None
    except Conflict as exc:
        raise Conflicting(str(exc)) from None
    except AdaptersError as exc:
        raise ServeError(str(exc)) from None


def _render(request: Request, template: str, **context: Any) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(request, template, context)


# Page shells: the same public page at every console address; its script fetches the fragment with the key.
SECTIONS = {"": "adapters", "adapters": "adapters", "versions": "adapters", "diff": "diff", "playground": "playground"}


@router.get("/ui", response_class=HTMLResponse)
@router.get("/ui/adapters/{name}", response_class=HTMLResponse)
@router.get("/ui/versions/{ref:path}", response_class=HTMLResponse)
@router.get("/ui/diff", response_class=HTMLResponse)
@router.get("/ui/playground", response_class=HTMLResponse)
@router.get("/ui/live", response_class=HTMLResponse)
def shell(request: Request, con: ConsoleDep) -> HTMLResponse:
    """An empty page that loads its content with the key kept in this tab (sessionStorage)."""
    raw = request.scope.get("raw_path", request.url.path.encode()).decode()
    rest = raw.removeprefix("/ui").strip("/")
    source = "/ui/part/" + (rest or "adapters")
    if request.url.query:
        source += f"?{request.url.query}"
    section = SECTIONS.get(rest.split("/")[0], rest.split("/")[0])
    return _render(request, "shell.html", source=source, section=section, serving=con.engine is not None)


@router.get("/ui/part/adapters", response_class=HTMLResponse)
def adapters_part(request: Request, tenant: CallerDep, con: ConsoleDep, q: str = "", page: int = 1) -> HTMLResponse:
    """The adapters the caller may use, searchable, a page at a time."""
    with _registry_errors():
        found = views.adapters(con.pages, tenant.may_use, q.strip(), page)
    return _render(request, "adapters.html", page=found, q=q.strip())


@router.get("/ui/part/adapters/{name}", response_class=HTMLResponse)
def adapter_part(request: Request, name: str, tenant: CallerDep, con: ConsoleDep, page: int = 1) -> HTMLResponse:
    """One adapter's versions and stage history; promote and roll back for the admin."""
    with _registry_errors():
        data = views.adapter(con.pages, tenant.may_use, name, page)
    return _render(request, "adapter.html", adapter=data, admin=tenant.admin)


@router.get("/ui/part/versions/{ref:path}", response_class=HTMLResponse)
def version_part(request: Request, ref: str, tenant: CallerDep, con: ConsoleDep) -> HTMLResponse:
    """One version: lineage, loss curve, model card, files, origin; load and unload for the admin."""
    with _registry_errors():
        data = views.version(con.pages, tenant.may_use, ref)
    serving = con.engine is not None
    return _render(request, "version.html", v=data, admin=tenant.admin, serving=serving)


@router.get("/ui/part/diff", response_class=HTMLResponse)
def diff_part(request: Request, tenant: CallerDep, con: ConsoleDep, left: str = "", right: str = "") -> HTMLResponse:
    """What differs between two versions, as `adapters diff` says."""
    data = None
    if left and right:
        with _registry_errors():
            data = views.diff(con.pages, tenant.may_use, left, right)
    return _render(request, "diff.html", diff=data, left=left, right=right, sections=views.report.DIFF_SECTIONS)


@router.get("/ui/part/playground", response_class=HTMLResponse)
def playground_part(request: Request, tenant: CallerDep, con: ConsoleDep) -> HTMLResponse:
    """One prompt to the base model and up to four versions or stages, streamed side by side."""
    if con.engine is None or con.catalog is None:
        return _render(request, "browse_only.html", what="The playground")
    state = con.catalog.state
    refs: list[str] = []
    for name, adapter in state.adapters.items():
        if tenant.may_use(name):
            refs += [name, *(f"{name}#{stage}" for stage in adapter.stages())]
            refs += [v.ref for v in reversed(adapter.versions[-5:])]
    return _render(
        request, "playground.html", base=con.engine.model_id, refs=refs[:1000], columns=range(PLAYGROUND_COLUMNS)
    )


@router.get("/ui/part/live", response_class=HTMLResponse)
def live_part(request: Request, tenant: CallerDep, con: ConsoleDep) -> HTMLResponse:
    """Requests, tokens, errors and latency per model, refreshed by the page every 2 s."""
    if con.engine is None:
        return _render(request, "browse_only.html", what="The live view")
    return _render(request, "live.html", admin=tenant.admin)


@router.get("/ui/api/live")
async def live_data(tenant: CallerDep, con: ConsoleDep) -> dict[str, Any]:
    """The live view's figures, read from this server's Prometheus metrics."""
    if con.engine is None:
        raise Unavailable("This console serves no model (`adapters ui`): start `adapters serve` for live figures.")
    return live.snapshot(con.engine, con.catalog.fidelity if con.catalog else None, tenant)


@router.get("/ui/api/rollback")
def rollback_preview(name: str, stage: str, tenant: AdminDep, con: ConsoleDep) -> dict[str, str]:
    """What a rollback of NAME's STAGE would leave the stage holding, before it is confirmed."""
    with _registry_errors():
        return views.rollback_target(con.pages, tenant.may_use, name, stage)


class PromoteBody(BaseModel):
    """A promotion, as `adapters promote REF --stage STAGE [-m MESSAGE]` takes it."""

    ref: str = Field(max_length=300)
    stage: str = Field(max_length=100)
    message: str | None = Field(None, max_length=500)


class RollbackBody(BaseModel):
    """A rollback, as `adapters rollback NAME --stage STAGE [--to REF]` takes it."""

    name: str = Field(max_length=200)
    stage: str = Field(max_length=100)
    to: str | None = Field(None, max_length=300)


@router.post("/ui/api/promote", dependencies=[Depends(json_only)])
def promote(body: PromoteBody, tenant: AdminDep, con: ConsoleDep) -> dict[str, Any]:
    """Assign a stage, writing the same tags as `adapters promote`; this server's catalog sees it at once."""
    with _registry_errors():
        version, previous = con.registry.promote(body.ref, body.stage, body.message)
    _refresh(con)
    return {"ref": version.ref, "stage": body.stage, "was": previous.ref if previous else None}


@router.post("/ui/api/rollback", dependencies=[Depends(json_only)])
def rollback(body: RollbackBody, tenant: AdminDep, con: ConsoleDep) -> dict[str, Any]:
    """Give a stage back to its previous version, writing the same tags as `adapters rollback`."""
    with _registry_errors():
        now, was = con.registry.rollback(body.name, body.stage, body.to)
    _refresh(con)
    return {"ref": now.ref, "stage": body.stage, "was": was.ref}


def _refresh(con: Console) -> None:
    """Re-read the registry now rather than at the next poll; a failure is the poll's to report."""
    if con.catalog is not None:
        with contextlib.suppress(ServeError):
            con.catalog.refresh()
