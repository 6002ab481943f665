"""Sampling limits: a request's parameters turned into the engine's Sampling, within the context, the server's cap
and the tenant's limit."""

from __future__ import annotations

from dataclasses import replace

from adapterctl.serve.api.dependencies import ServerState
from adapterctl.serve.api.protocol import ChatRequest, CompletionRequest
from adapterctl.serve.api.tenants import Tenant
from adapterctl.serve.engines.base import Sampling
from adapterctl.serve.errors import BadRequest

# As vLLM: a temperature above 0 but below this samples at this one (smaller ones overflow the scaled logits).
MIN_TEMPERATURE = 0.01


def prompt_field(body: CompletionRequest | ChatRequest) -> str:
    """The request field that holds the prompt, as an error names it."""
    return "messages" if isinstance(body, ChatRequest) else "prompt"


def sampling(
    server: ServerState, tenant: Tenant, body: CompletionRequest | ChatRequest, prompt_tokens: int
) -> Sampling:
    """The request's sampling, its max_tokens within the server's cap, the tenant's limit and the context."""
    context = server.engine.context_length
    room = context - prompt_tokens
    if room <= 0:
        raise BadRequest(
            f"The prompt is {prompt_tokens} tokens; this model's context holds {context} tokens "
            "for prompt and completion together.",
            param=prompt_field(body),
        )
    cap, whose = server.settings.max_tokens_cap, "this server's cap (--max-tokens-cap)"
    if tenant.max_tokens is not None and tenant.max_tokens < cap:
        cap, whose = tenant.max_tokens, f"the limit of tenant {tenant.name!r}"
    requested = body.limit()
    if requested is not None and requested > cap:
        raise BadRequest(f"max_tokens is {requested}, above {whose} of {cap} tokens per request.", param="max_tokens")
    if requested is not None and requested > room:
        raise BadRequest(
            f"This model's context holds {context} tokens; the prompt has {prompt_tokens}, "
            f"so max_tokens can be at most {room} (asked for {requested}).",
            param="max_tokens",
        )
    temperature = 1.0 if body.temperature is None else body.temperature
    top = body.reported_logprobs()
    return Sampling(
        max_tokens=requested or min(cap, room),
        temperature=temperature if temperature == 0 else max(temperature, MIN_TEMPERATURE),
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stops(),
        seed=body.seed,
        ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=body.biases(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        json_schema=body.schema(),
        # best_of ranks candidates by their tokens' log-probabilities, so it needs them even when not shown.
        logprobs=top if top is not None else (0 if body.candidates() > body.n else None),
        prompt_logprobs=top if body.echoes() and top is not None else None,
    )


def bound_prompt_logprobs(
    server: ServerState, samplings: list[Sampling], prompt_ids: list[list[int]], candidates: int
) -> None:
    """Refuse echo + logprobs whose prompt log-probabilities (each generation returns its own) exceed the bound."""
    top = samplings[0].prompt_logprobs
    if top is None:
        return
    positions = sum(len(ids) for ids in prompt_ids) * candidates
    bound = server.settings.max_prompt_logprobs
    if positions * (top + 1) > bound:
        raise BadRequest(
            f"echo with logprobs {top} returns {positions * (top + 1)} prompt log-probabilities here ({positions} "
            f"prompt tokens x generations, {top + 1} each), over this server's {bound}: send fewer prompts or "
            "choices per request, or a lower logprobs.",
            param="logprobs",
        )


def for_choice(sampling: Sampling, number: int) -> Sampling:
    """SAMPLING for the request's generation NUMBER: a seed given moves on by it, so candidates differ."""
    if sampling.seed is None:
        return sampling
    return replace(sampling, seed=_wrap(sampling.seed + number))


def _wrap(seed: int) -> int:
    """A seed plus a choice number, kept within the 64 bits a seed may hold."""
    return (seed + (1 << 63)) % (1 << 64) - (1 << 63)
