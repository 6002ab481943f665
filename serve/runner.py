"""The batch runner of the transformers engine: prefill, decode and pick each row's next token, all rows at once."""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Any

import torch

from serve import attention
from serve.engine import Chunk, EngineError, GenerationFailed, Sampling, TokenLogprob
from serve.engine import Item
from serve.generation import Generation, deliver
from serve.grammar import Grammars
from serve.kvcache import BlockCache
from serve.lora import Rows, plan
from serve.textstream import TextStream

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
    """The running rows of one model and its row cache; rows join at a prefill and leave when done.

    A prompt longer than PREFILL_CHUNK tokens is prefilled a chunk per step (`fill`), between decode steps, so
    that it delays the running rows' next token by one chunk's pass at most; until its last chunk it holds the
    cache row just past the running ones.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        rows: Rows,
        *,
        max_batch: int,
        context_length: int,
        grammars: Grammars,
        eos: set[int],
        prefill_chunk: int = 0,
    ) -> None:
        model.set_attn_implementation(attention.NAME)
        if model.config._attn_implementation != attention.NAME:
            raise EngineError(f"{type(model).__name__} does not take a pluggable attention; it cannot be served here.")
        self.backbone = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.tokenizer = tokenizer
        self.plans = rows  # what every LoRA layer reads: the current pass's rows -> adapter slots
        self.cache = BlockCache(max_batch)
        self.context_length = context_length
        self.grammars = grammars
        self.eos = eos
        self.pad = tokenizer.pad_token_id or 0
        self.rows: list[Row] = []
        self.prefill_chunk = prefill_chunk  # 0: every prompt in one pass
        self.filling: Row | None = None  # the long prompt being prefilled, a chunk per step
        self.queued: deque[Generation] = deque()  # long prompts waiting to be filled, oldest first
        self.passes: Counter[int] = Counter()  # rows per forward pass -> passes
        self.chunks = 0  # prefill chunks of long prompts run so far

    def held(self) -> int:
        """Batch rows taken: running, being filled or queued to be."""
        return len(self.rows) + (self.filling is not None) + len(self.queued)

    def generations(self) -> list[Generation]:
        """The generations holding rows now."""
        filling = [self.filling.generation] if self.filling is not None else []
        return [row.generation for row in self.rows] + filling + list(self.queued)

    def admit(self, generations: list[Generation]) -> list[Generation]:
        """Queue the long prompts of GENERATIONS to be filled in chunks, prefill the others now; returns those that
        failed (each told its error)."""
        long = [g for g in generations if self._chunked(g)]
        self.queued.extend(long)
        short = [g for g in generations if g not in long]
        return self.prefill_apart(short) if short else []

    def _chunked(self, generation: Generation) -> bool:
        # Prompt log-probabilities are scored over the whole prompt in one pass, so those prompts are not chunked.
        return 0 < self.prefill_chunk < len(generation.prompt_ids) and generation.sampling.prompt_logprobs is None

    def fill(self) -> None:
        """Prefill the next chunk of the oldest long prompt; after its last, it joins the running rows.

        A failure fails that generation alone; its row leaves at the next drop.
        """
        if self.filling is None:
            if not self.queued:
                return
            self.filling = self._new_row(self.queued.popleft())
        row = self.filling
        try:
            self._chunk(row)
        except Exception as exc:
            log.exception("The engine failed a request's prompt; it gets an error.")
            fail([row.generation], exc)

    def _chunk(self, row: Row) -> None:
        prompt = row.generation.prompt_ids
        start, end = row.length, min(len(prompt), row.length + self.prefill_chunk)
        self.cache.prefill(len(self.rows), [end - start], start)  # the cache row past the running ones
        self.plans.plan = plan([row.slot], end - start)
        queries, keys = torch.arange(start, end), torch.arange(end)
        mask = (keys[None, :] <= queries[:, None])[None, None]
        hidden = self.forward(torch.tensor([prompt[start:end]]), mask, queries[None])
        row.length = end
        self.passes[1] += 1
        self.chunks += 1
        if end == len(prompt):
            self.filling = None
            self.rows.append(row)
            self._advance([row], self.head(hidden[:, -1]))

    def prefill_apart(self, generations: list[Generation]) -> list[Generation]:
        """Prefill GENERATIONS together; if that fails, each alone, so that only those that fail alone fail.

        Returns the failed ones (each told its error).
        """
        try:
            self.prefill(generations)
        except Exception as exc:
            if len(generations) == 1:
                log.exception("The engine failed a request's prompt; it gets an error.")
                fail(generations, exc)
                return generations
            return [failed for generation in generations for failed in self.prefill_apart([generation])]
        return []

    def prefill(self, generations: list[Generation]) -> None:
        """Run GENERATIONS' prompts in one pass; they join the batch with their first token picked."""
        first = len(self.rows)
        rows = [self._new_row(g) for g in generations]
        lengths = torch.tensor([len(g.prompt_ids) for g in generations])
        longest = int(lengths.max())
        ids = torch.full((len(rows), longest), self.pad, dtype=torch.long)
        for i, generation in enumerate(generations):
            ids[i, : len(generation.prompt_ids)] = torch.tensor(generation.prompt_ids)
        positions = torch.arange(longest)
        causal = positions[None, :] <= positions[:, None]
        mask = causal[None, :, :] & (positions[None, None, :] < lengths[:, None, None])
        # A long prompt being filled keeps its cache row just past the running ones: it moves past the new rows.
        parked = self.filling is not None
        if parked:
            self.cache.move(first, first + len(rows))
        try:
            self.cache.prefill(first, lengths.tolist())
            self.plans.plan = plan([row.slot for row in rows], longest)
            hidden = self.forward(ids, mask[:, None], positions.expand(len(rows), -1))
            logits = self.head(hidden[torch.arange(len(rows)), lengths - 1])
            for i, generation in enumerate(generations):
                if generation.sampling.prompt_logprobs is not None:
                    length = len(generation.prompt_ids)
                    scores = self.head(hidden[i, : length - 1])  # each position scores the next prompt token
                    generation.prompt_logprobs = _logprobs(
                        scores, ids[i, 1:length].tolist(), generation.sampling.prompt_logprobs
                    )
        except Exception:
            if parked:  # the batch as it was, to prefill again
                self.cache.move(first + len(rows), first)
            raise
        for row, length in zip(rows, lengths.tolist(), strict=True):
            row.length = length
        self.rows.extend(rows)  # last: until here a failure leaves the batch as it was, to prefill again
        self.passes[len(rows)] += 1
        self._advance(rows, logits)

    def decode(self) -> None:
        """One token more for every running row, in one pass."""
        rows = self.rows
        positions = torch.tensor([row.length for row in rows])
        self.cache.decode(positions)
        self.plans.plan = plan([row.slot for row in rows], 1)
        keys = torch.arange(int(positions.max()) + 1)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
        ids = torch.tensor([[row.last] for row in rows])
        hidden = self.forward(ids, mask, positions[:, None])
        for row in rows:
            row.length += 1
        self.passes[len(rows)] += 1
        self._advance(rows, self.head(hidden[:, -1]))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states for IDS, its keys and values kept in the row cache."""
        out = self.backbone(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            blocks=self.cache,  # what the attention layers read (`serve.attention`)
        )
        return out.last_hidden_state

    def drop_finished(self) -> list[Generation]:
        """Free the rows of finished or cancelled generations (the last row moves into each gap); returns theirs."""
        left = [g for g in self.queued if g.cancelled]
        self.queued = deque(g for g in self.queued if not g.cancelled)
        if self.filling is not None and self.filling.generation.cancelled:
            left.append(self.filling.generation)
            self.filling = None
        running = len(self.rows)
        for i in range(len(self.rows) - 1, -1, -1):
            row = self.rows[i]
            if not row.generation.cancelled:
                continue
            last = self.rows.pop()
            if last is not row:
                self.cache.move(len(self.rows), i)
                self.rows[i] = last
            left.append(row.generation)
        if self.filling is not None and running != len(self.rows):  # its cache row stays just past the running ones
            self.cache.move(running, len(self.rows))
        self.cache.shrink(len(self.rows) + (self.filling is not None))
        return left

    def _new_row(self, generation: Generation) -> Row:
        generator = torch.Generator()
        if generation.sampling.seed is not None:
            generator.manual_seed(generation.sampling.seed)
        else:
            generator.seed()
        schema = generation.sampling.json_schema
        matcher = self.grammars.matcher(schema) if schema is not None else None
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
            if isinstance(chunk, BaseException) or chunk.finish_reason:
                generation.cancelled = True  # finished or failed: the row leaves the batch
        deliver(outbox)

    def _next(self, row: Row, greedy: int, logits: torch.Tensor, raw: torch.Tensor) -> Chunk:
        """Pick ROW's next token and say what text it adds and whether the generation ends there."""
        generation, sampling = row.generation, row.generation.sampling
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
