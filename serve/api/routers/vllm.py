"""vLLM's operator endpoints, so tools scripted against `vllm serve` work unchanged: tokenizer, version, health,
runtime LoRA load and unload (by registry reference only, never by path)."""

from __future__ import annotations

import asyncio
import importlib.metadata
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from adapterctl.serve.api.dependencies import AdminDep, CallerDep, ServerDep, admin
from adapterctl.serve.errors import AdapterNotFound, BadRequest
from adapterctl.serve.api.routers import admin as admin_routes
from adapterctl.serve.api.routers.health import alive
from adapterctl.serve.api.protocol import AdapterRequest, Message

router = APIRouter(tags=["vllm"])


class TokenizeRequest(BaseModel):
    """POST /tokenize: a prompt, or chat messages rendered with the chat template."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Checked like a generation's model when given.")
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = Field(True, description="Add the tokenizer's special tokens to a prompt.")


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class LoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter, as vLLM names the fields."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(description="An adapter reference: NAME, NAME@vX.Y.Z, NAME#STAGE or NAME@latest.")
    lora_path: str | None = Field(None, description="Refused: adapters come from the registry, never from a path.")


def _check_model(parts: Any, tenant: Any, model: str | None) -> None:
    """A named model must be one the caller may use (the tokenizer is the base's for every adapter)."""
    if model is not None:
        parts.catalog.lookup(model, tenant.may_use)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, tenant: CallerDep, parts: ServerDep) -> dict[str, Any]:
    """Token ids of a prompt or a chat, as the server would feed them to the model."""
    _check_model(parts, tenant, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise BadRequest("Send either prompt or messages.", param="prompt")
    if body.messages is not None:
        messages = [m.plain() for m in body.messages]
        tokens = await asyncio.to_thread(parts.engine.encode_chat, messages)
    else:
        tokens = await asyncio.to_thread(parts.engine.encode, body.prompt, body.add_special_tokens)
    return {"count": len(tokens), "max_model_len": parts.engine.context_length, "tokens": tokens, "token_strs": None}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, tenant: CallerDep, parts: ServerDep) -> dict[str, str]:
    """The text of token ids."""
    _check_model(parts, tenant, body.model)
    vocabulary = parts.engine.tokenizer_info()["vocab_size"]
    if any(not 0 <= token < vocabulary for token in body.tokens):
        raise BadRequest(f"Token ids must lie in [0, {vocabulary}).", param="tokens")
    return {"prompt": await asyncio.to_thread(parts.engine.decode, body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(tenant: CallerDep, parts: ServerDep) -> dict[str, Any]:
    """The base model's tokenizer: special tokens, chat template, class, context length (lm-eval reads it)."""
    return parts.engine.tokenizer_info()


@router.get("/version")
async def version() -> dict[str, str]:
    """The server's version."""
    return {"version": importlib.metadata.version("adapterctl")}


@router.get("/health")
async def health(parts: ServerDep) -> Response:
    """200 while the engine lives, 503 once it died (vLLM's liveness probe; /healthz and /readyz say more)."""
    alive(parts.engine)
    return Response(status_code=200)


def _by_reference(body: LoRAAdapterRequest) -> AdapterRequest:
    if body.lora_path is not None:
        raise BadRequest(
            "Adapters are loaded from the registry by reference (lora_name: NAME, NAME@vX.Y.Z, NAME#STAGE); "
            "lora_path is not accepted.",
            param="lora_path",
        )
    return AdapterRequest(model=body.lora_name)


@router.post("/v1/load_lora_adapter", dependencies=[Depends(admin)], response_class=PlainTextResponse)
async def load_lora_adapter(body: LoRAAdapterRequest, tenant: AdminDep, parts: ServerDep) -> str:
    """Load an adapter version now, as vLLM's runtime LoRA loading (admin key)."""
    loaded = await admin_routes.load(_by_reference(body), tenant, parts)
    return f"Success: LoRA adapter '{loaded['model']}' added successfully."


@router.post("/v1/unload_lora_adapter", dependencies=[Depends(admin)], response_class=PlainTextResponse)
async def unload_lora_adapter(body: LoRAAdapterRequest, tenant: AdminDep, parts: ServerDep) -> str:
    """Drop an adapter version from memory, as vLLM's runtime LoRA unloading (admin key)."""
    unloaded = await admin_routes.unload(_by_reference(body), tenant, parts)
    if not unloaded["unloaded"]:
        raise AdapterNotFound(f"The LoRA adapter '{unloaded['model']}' is not loaded, or a request is using it.")
    return f"Success: LoRA adapter '{unloaded['model']}' removed successfully."
