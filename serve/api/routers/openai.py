"""The OpenAI-compatible API: completions, chat completions and the caller's models."""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from adapterctl.registry.refs import AdapterVersion
from adapterctl.serve.api.serving import Prompt, generate
from adapterctl.serve.api.dependencies import CallerDep, ServerState, ServerDep
from adapterctl.serve.api.protocol import ChatRequest, CompletionRequest


router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, tenant: CallerDep, parts: ServerDep) -> Response:
    """Continue a prompt (or several: text or token ids) with the base model or an adapter version."""
    prompts = [_prompt(parts, prompt) for prompt in body.prompts()]
    return await generate(request, parts, tenant, body, prompts)


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, tenant: CallerDep, parts: ServerDep) -> Response:
    """Answer a chat with the base model or an adapter version, rendered with the base model's chat template."""
    messages, tools = [message.plain() for message in body.messages], body.rendered_tools()
    prompt = Prompt(partial(parts.engine.encode_chat, messages, tools), body.characters())
    return await generate(request, parts, tenant, body, [prompt])


def _prompt(parts: ServerState, prompt: str | list[int]) -> Prompt:
    """A completion prompt: text tokenized when it runs, or token ids as sent."""
    if isinstance(prompt, str):
        return Prompt(lambda: parts.engine.encode(prompt), len(prompt), prompt)
    return Prompt(lambda: list(prompt))


@router.get("/models")
async def models(tenant: CallerDep, parts: ServerDep) -> dict[str, Any]:
    """The base model and every adapter the caller may use, each with the version its bare name means now."""
    adapters = parts.catalog.names(tenant.may_use)
    data = [_entry(parts, parts.engine.model_id, None)] + [_entry(parts, n, v) for n, v in adapters.items()]
    return {"object": "list", "data": data}


@router.get("/models/{model:path}")
async def model(model: str, tenant: CallerDep, parts: ServerDep) -> dict[str, Any]:
    """One model by id: the base, or an adapter reference the caller may use."""
    return _entry(parts, model, parts.catalog.lookup(model, tenant.may_use))


def _entry(parts: ServerState, model: str, version: AdapterVersion | None) -> dict[str, Any]:
    """A model object as OpenAI lists it, with vLLM's root and max_model_len; an adapter also names its parent and
    the version it means now (its root: vLLM's is the adapter's path, which a registry version stands for here)."""
    common = {"id": model, "object": "model", "owned_by": "adapters", "max_model_len": parts.engine.context_length}
    if version is None:
        return {**common, "created": parts.started, "root": parts.engine.model_id, "parent": None}
    entry = {
        **common,
        "created": version.date,
        "root": version.ref,
        "parent": parts.engine.model_id,
        "version": version.ref,
    }
    if parts.catalog.fidelity is not None:  # the base precision it was trained against, next to this server's
        entry["fidelity"] = parts.catalog.fidelity.describe(parts.catalog.registry, [version])[version.ref]
    return entry
