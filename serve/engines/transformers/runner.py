"""The batch runner of the transformers engine: prefill, decode and pick each row's next token, all rows at once."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import torch

from adapterctl.serve.engines.transformers import attention
from adapterctl.serve.engines.base import Chunk, EngineError, GenerationFailed, Sampling, TokenLogprob
from adapterctl.serve.engines.base import Item
from adapterctl.serve.engines.transformers.generation import Generation, deliver
from adapterctl.serve.engines.grammar import Grammars
from adapterctl.serve.engines.transformers.kvcache import BlockCache
from adapterctl.serve.engines.transformers.lora import SharedPlan, plan
from adapterctl.serve.engines.transformers.textstream import TextStream

log = logging.getLogger("serve")


@dataclass(eq=False)
class Row:
    """A generation holding a batch row: its tokens so far and how to pick the next one."""

    generation: Generation
    stream: TextStream
    generator: torch.Generator
    length: int = 0  # tokens in the cache
    last: int = 0  # the token the next decode step feeds
    counts: dict[int, int] | None = None  # tokens generated so far, kept only when penalties need them
    matcher: Any = None  # the grammar state of a row whose output must match a JSON schema

    @property
    def key(self) -> str | None:
        adapter = self.generation.adapter
        return adapter.key if adapter else None

    @property
    def slot(self) -> int | None:
        pinned = self.generation.pinned
        return None if pinned is None else pinned.slot


class Runner:
    """The running rows of one model and its row cache; rows join once their prompt is prefilled and leave when done.

    Each step is one forward pass over one sequence of segments, no padding: every running row's next token, then parts
    of admitted prompts (so a prompt is prefilled over steps while running rows get a token every step). A pass holds at
    most MAX_BATCHED_TOKENS tokens, the running rows' included (a prompt part of at least one token always goes, so
    prompts always advance). Each prompt part is at most PREFILL_CHUNK tokens (0: a whole prompt), the last one cut to
    the budget; budget left over goes to the chosen parts, oldest first. The prompts, in turn: the oldest that needs
    more than one part (so long prompts always advance), those that end in this pass, by their request's priority then
    oldest first (so a short prompt is never held behind long ones, nor one tenant's behind another's queue), then the
    other long ones. Under fair share, when a tenant's only prompt here is ready while another tenant has a queue of
    them here, it takes a pass of its own (with the other lone ones and the running rows' tokens; at most every other
    pass), so its first token waits for the pass running now and one short pass, not a full pass of another tenant's
    prompts. A running row whose reader is behind (`Generation.behind`) is parked: it keeps its cache but sits out
    passes until its reader catches up. The cache rows hold the running rows, then the parked ones, then those being
    prefilled (so that admitting more moves none).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        rows: SharedPlan,
        *,
        max_batch: int,
        context_length: int,
        grammars: Grammars,
        eos: set[int],
        capacity: int,
        prefill_chunk: int = 0,
        max_batched_tokens: int = 128,
    ) -> None:
        model.set_attn_implementation(attention.NAME)
        if model.config._attn_implementation != attention.NAME:
            raise EngineError(f"{type(model).__name__} does not take a pluggable attention; it cannot be served here.")
        self.backbone = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.tokenizer = tokenizer
        self.plans = rows  # what every LoRA layer reads: the current pass's rows -> adapter slots
        self.cache = BlockCache(max_batch, capacity)
        self.context_length = context_length
        self.grammars = grammars
        self.eos = eos
        self.rows: list[Row] = []
        self.prefill_chunk = prefill_chunk  # 0: every prompt in one pass
        self.max_batched_tokens = max_batched_tokens
        self.filling: list[Row] = []  # admitted, their prompts being prefilled, oldest first
        self.parked: list[Row] = []  # running rows whose reader is behind
        self.lone_last = False  # whether the last pass took only prompts of tenants with no other one here
        self.passes: Counter[int] = Counter()  # rows per forward pass -> passes

    def held(self) -> int:
        """Batch rows taken: running, being filled or parked."""
        return len(self.rows) + len(self.filling) + len(self.parked)

    def generations(self) -> list[Generation]:
        """The generations holding rows now."""
        return [row.generation for row in self._held()]

    def busy(self) -> bool:
        """Whether a step has work: rows to fill or decode, or a parked row whose reader caught up or left."""
        return bool(self.rows or self.filling or any(not row.generation.behind for row in self.parked))

    def park(self) -> None:
        """Running rows whose reader is behind sit out the next decode passes; parked rows caught up run again."""
        parking = [row for row in self.rows if row.generation.behind]
        resuming = [row for row in self.parked if not row.generation.behind]
        if not parking and not resuming:
            return
        index = {id(row): i for i, row in enumerate(self._held())}
        rows = [row for row in self.rows if row not in parking] + resuming
        parked = [row for row in self.parked if row not in resuming] + parking
        self.cache.keep([index[id(row)] for row in rows + parked + self.filling])
        self.rows, self.parked = rows, parked

    def _held(self) -> list[Row]:
        """Every row, in the order of their cache rows."""
        return self.rows + self.parked + self.filling

    def admit(self, generations: list[Generation]) -> None:
        """GENERATIONS take rows; their prompts are prefilled over the next steps (`step`)."""
        self.filling.extend(self._new_row(g) for g in generations)

    def _plan(self, decoding: int) -> list[tuple[Row, int]]:
        """The prompt parts the next pass takes beside DECODING running rows' tokens, each (row, its tokens)."""
        budget = self.max_batched_tokens - decoding
        chunk = self.prefill_chunk or self.context_length
        left = {id(row): len(row.generation.prompt_ids) - row.length for row in self.filling}
        long = [row for row in self.filling if left[id(row)] > chunk]
        ending = sorted((row for row in self.filling if left[id(row)] <= chunk), key=_priority)
        lone = self._lone(ending)
        if lone:  # a pass of their own: their first token waits for the pass running now and this short one
            long, ending = [], lone
        parts: list[list] = []
        for row in long[:1] + ending + long[1:]:
            part = min(left[id(row)], chunk, budget if parts else max(budget, 1))
            if part <= 0:
                break
            parts.append([row, part])
            budget -= part
        if self.prefill_chunk:  # room left: the chosen parts grow, oldest first
            for entry in sorted(parts, key=lambda entry: self.filling.index(entry[0])):
                more = max(0, min(left[id(entry[0])] - entry[1], budget))
                entry[1] += more
                budget -= more
        return [(row, part) for row, part in parts]

    def _lone(self, ending: list[Row]) -> list[Row]:
        """The prompts this pass ends whose tenant has no other prompt here, when another tenant has a queue of them
        here; none every other pass, so the queue always advances."""
        tenants = Counter(row.generation.request.tenant for row in self.filling)
        lone = [row for row in ending if tenants[row.generation.request.tenant] == 1]
        if self.lone_last or not lone or len(tenants) < 2 or max(tenants.values()) < 2:
            self.lone_last = False
            return []
        self.lone_last = True
        return lone

    def step(self) -> None:
        """One pass (see the class): running rows get their next token; rows whose prompt it ends join them with their
        first.

        If the pass fails with prompt parts in it, the running rows' tokens run alone, then each part alone, so that
        only parts that fail alone fail (each told its error; its row leaves at the next drop); a pass of running rows
        alone that fails raises.
        """
        decoding = list(self.rows)
        parts = self._plan(len(decoding)) if self.filling else []
        if not decoding and not parts:
            return
        try:
            logits, ended = self._pass(decoding, parts)
        except Exception as exc:
            if not parts:
                raise
            if len(parts) == 1 and not decoding:
                log.exception("The engine failed a request's prompt; it gets an error.")
                fail([parts[0][0].generation], exc)
                return
            logits, ended = self._pass(decoding, []) if decoding else (None, [])
            for part in parts:
                try:
                    ended += self._pass([], [part])[1]
                except Exception as alone:
                    log.exception("The engine failed a request's prompt; it gets an error.")
                    fail([part[0].generation], alone)
        joined = self._join([row for row, _ in ended])
        first_logits = dict((id(row), scores) for row, scores in ended)
        scores = ([logits] if logits is not None else []) + [first_logits[id(row)][None] for row in joined]
        if scores:
            self._advance(decoding + joined, torch.cat(scores))

    def _pass(
        self, decoding: list[Row], parts: list[tuple[Row, int]]
    ) -> tuple[torch.Tensor | None, list[tuple[Row, torch.Tensor]]]:
        """Run DECODING rows' next tokens and PARTS (row, tokens) of prompts in one pass: the running rows' next logits
        (None without them), and the rows whose prompt it ends, with theirs."""
        first = len(self.rows) + len(self.parked)
        cache_rows = list(range(len(decoding))) + [first + self.filling.index(row) for row, _ in parts]
        starts = [row.length for row in decoding] + [row.length for row, _ in parts]
        takes = [1] * len(decoding) + [take for _, take in parts]
        ids = [row.last for row in decoding]
        for row, take in parts:
            ids += row.generation.prompt_ids[row.length : row.length + take]
        positions = [p for start, take in zip(starts, takes, strict=True) for p in range(start, start + take)]
        slots = [row.slot for row in decoding] + [row.slot for row, take in parts for _ in range(take)]
        self.cache.pack(cache_rows, starts, takes)
        self.plans.plan = plan(slots, 1)
        hidden = self.forward(torch.tensor([ids]), torch.tensor([positions]))
        self.passes[len(takes)] += 1
        logits = self.head(hidden[: len(decoding)]) if decoding else None
        offsets = (torch.cumsum(torch.tensor(takes), 0) - torch.tensor(takes)).tolist()[len(decoding) :]
        scored = [
            self._prompt_logprobs(row, hidden[offset : offset + take], take)
            for (row, take), offset in zip(parts, offsets, strict=True)
        ]
        ended = []
        for row in decoding:  # last: until here a failure leaves every row as it was
            row.length += 1
        for (row, take), offset, logprobs in zip(parts, offsets, scored, strict=True):
            row.length += take
            if logprobs:
                row.generation.prompt_logprobs = (row.generation.prompt_logprobs or []) + logprobs
            if row.length == len(row.generation.prompt_ids):
                ended.append((row, self.head(hidden[offset + take - 1])))
        return logits, ended

    def _prompt_logprobs(self, row: Row, hidden: torch.Tensor, take: int) -> list[TokenLogprob]:
        """The log-probabilities of the prompt tokens this part's positions predict, when ROW asks for them."""
        top = row.generation.sampling.prompt_logprobs
        prompt = row.generation.prompt_ids
        scoring = min(take, len(prompt) - 1 - row.length)  # the last prompt token predicts no prompt token
        if top is None or scoring <= 0:
            return []
        next_tokens = list(prompt[row.length + 1 : row.length + 1 + scoring])
        return _logprobs(self.head(hidden[:scoring]), next_tokens, top)

    def _join(self, ended: list[Row]) -> list[Row]:
        """ENDED rows leave the filling ones for the running ones (their cache rows too); returns them in that order."""
        if not ended:
            return []
        done = {id(row) for row in ended}
        running, parked = len(self.rows), range(len(self.rows), len(self.rows) + len(self.parked))
        filling = range(parked.stop, self.held())
        joining = [i for i, row in zip(filling, self.filling, strict=True) if id(row) in done]
        staying = [i for i, row in zip(filling, self.filling, strict=True) if id(row) not in done]
        self.cache.keep(list(range(running)) + joining + list(parked) + staying)
        rows = [row for row in self.filling if id(row) in done]
        self.filling = [row for row in self.filling if id(row) not in done]
        self.rows.extend(rows)
        return rows

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states, (tokens, hidden), for the pass's tokens IDS (1, tokens) as `cache.pack`
        laid them out; their keys and values kept in the row cache."""
        out = self.backbone(
            input_ids=ids,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            blocks=self.cache,  # what the attention layers read (`serve.engines.transformers.attention`)
        )
        return out.last_hidden_state[0]

    def drop_finished(self) -> list[Generation]:
        """Free the rows of finished or cancelled generations (the others keep their order); returns theirs."""
        held = self._held()
        left = [row.generation for row in held if row.generation.cancelled]
        if left:
            self.cache.keep([i for i, row in enumerate(held) if not row.generation.cancelled])
            self.rows = [row for row in self.rows if not row.generation.cancelled]
            self.filling = [row for row in self.filling if not row.generation.cancelled]
            self.parked = [row for row in self.parked if not row.generation.cancelled]
        self.cache.shrink(self.held())
        return left

    def _new_row(self, generation: Generation) -> Row:
        generator = torch.Generator()
        if generation.sampling.seed is not None:
            generator.manual_seed(generation.sampling.seed)
        else:
            generator.seed()
        # A fresh copy of the matcher its request compiled (`Engine.prepare`): nothing is compiled on the batch loop.
        grammar = generation.sampling.grammar
        matcher = grammar.deep_copy() if grammar is not None else None
        return Row(generation, TextStream(self.tokenizer, generation.sampling.stop), generator, matcher=matcher)

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Pick each row's next token, send the new text of every row at once, and mark finished rows.

        A row whose logits are not finite, or whose token cannot be picked or decoded, fails alone.
        """
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        raw = logits  # log-probabilities report the model's own distribution, before penalties and biases
        if any(row.generation.sampling.adjusted for row in rows):
            logits = logits.clone()
            for i, row in enumerate(rows):
                if row.generation.sampling.adjusted:
                    _adjust(logits[i], row)
                    if row.matcher is not None:
                        self.grammars.restrict(row.matcher, logits[i])
        greedy = logits.argmax(dim=-1).tolist()
        outbox: list[tuple[Generation, Item]] = []
        for i, row in enumerate(rows):
            generation = row.generation
            if generation.cancelled:  # aborted while this pass ran: nothing more is sent
                continue
            chunk: Chunk | BaseException
            try:
                if not finite[i]:
                    raise _NonFinite(row.key)
                chunk = self._next(row, greedy[i], logits[i], raw[i])
                if not generation.started and generation.prompt_logprobs is not None:
                    chunk = replace(chunk, prompt_logprobs=tuple(generation.prompt_logprobs))
                generation.started = True
            except Exception as exc:
                if not isinstance(exc, EngineError):
                    log.exception("The engine failed one row; its request gets an error.")
                chunk = failure(exc)
            outbox.append((generation, chunk))
            generation.sent += 1
            if isinstance(chunk, BaseException) or chunk.finish_reason:
                generation.cancelled = True  # finished or failed: the row leaves the batch
        deliver(outbox)

    def _next(self, row: Row, greedy: int, logits: torch.Tensor, raw: torch.Tensor) -> Chunk:
        """Pick ROW's next token and say what text it adds and whether the generation ends there."""
        generation, sampling = row.generation, row.generation.sampling
        if row.matcher is not None and row.matcher.is_error():  # llguidance gave up: never a cut answer as "stop"
            raise _Unfollowable(row.matcher.get_error())
        token = greedy if sampling.temperature == 0 else _sample(logits, sampling, row.generator)
        generation.completion_tokens += 1
        row.last = token
        if sampling.adjusted:
            row.counts = row.counts or {}
            row.counts[token] = row.counts.get(token, 0) + 1
        scored = () if sampling.logprobs is None else tuple(_logprobs(raw[None], [token], sampling.logprobs))
        ids = (token,)
        if row.matcher is not None:
            row.matcher.consume_token(token)  # the mask let through only tokens the grammar accepts
            if row.matcher.is_error():
                raise _Unfollowable(row.matcher.get_error())
            if row.matcher.is_stopped():  # the JSON is whole: it ends here, as at end-of-sequence
                text = "" if token in self.eos else row.stream.push(token)[0]
                return Chunk(text + row.stream.rest(), ids, "stop", scored)
        if token in sampling.stop_token_ids:
            return Chunk(row.stream.rest(), ids, "stop", scored)
        if token in self.eos and not sampling.ignore_eos:
            return Chunk(row.stream.rest(), ids, "stop", scored)
        text, stopped = row.stream.push(token)
        if stopped:
            return Chunk(text, ids, "stop", scored)
        if generation.completion_tokens >= sampling.max_tokens or row.length + 1 >= self.context_length:
            return Chunk(text + row.stream.rest(), ids, "length", scored)
        return Chunk(text, ids, None, scored)


def _priority(row: Row) -> int:
    return row.generation.request.priority


def fail(generations: list[Generation], exc: BaseException) -> None:
    """End GENERATIONS with EXC as their error; their rows leave the batch at the next drop."""
    error = failure(exc)
    for generation in generations:
        generation.publish(error)
        generation.cancelled = True


def failure(exc: BaseException) -> EngineError:
    """EXC as the engine-neutral error its request raises (the details went to the log)."""
    if isinstance(exc, EngineError):
        return exc
    return GenerationFailed(f"The engine failed on this request ({type(exc).__name__}); see the server log.")


class _NonFinite(GenerationFailed):
    """A row's logits hold inf or NaN: its adapter's weights (or the prompt) overflow the model's numbers."""

    def __init__(self, adapter: str | None) -> None:
        by = f"adapter {adapter}" if adapter else "the base model"
        super().__init__(f"The model's output for this request is not finite (NaN or inf) with {by}; it was stopped.")


class _Unfollowable(GenerationFailed):
    """llguidance cannot follow a row's JSON schema any further (a limit met past the walk `Grammars.compile` made)."""

    def __init__(self, error: str) -> None:
        reason = error.strip().splitlines()[0] if error.strip() else "no reason given"
        super().__init__(
            f"The output could not follow response_format's JSON schema any further ({reason}); it was stopped."
        )


def _adjust(logits: torch.Tensor, row: Row) -> None:
    """Apply ROW's presence and frequency penalties and logit biases to its logits, in place (OpenAI's formula)."""
    sampling = row.generation.sampling
    if row.counts:
        tokens = torch.tensor(list(row.counts))
        counts = torch.tensor(list(row.counts.values()), dtype=logits.dtype)
        logits[tokens] -= sampling.presence_penalty + sampling.frequency_penalty * counts
    for token, bias in sampling.logit_bias:
        logits[token] += bias


def _logprobs(scores: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each position's log-probability of its token under SCORES (one row of logits per token), with the TOP
    most likely tokens there."""
    if not tokens:
        return []
    scored = torch.log_softmax(scores.float(), dim=-1)
    chosen = scored[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    if top:
        values, ids = scored.topk(top, dim=-1)
        tops = [tuple(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(t, lp, best) for t, lp, best in zip(tokens, chosen, tops)]


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Draw a token with temperature and nucleus (top-p) sampling from the row's own seeded generator."""
    # Double precision: a tiny temperature (vLLM's floor is 0.01) must not overflow the scaled logits.
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
