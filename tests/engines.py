"""Helpers that drive any engine as the HTTP layer does: a request from a prompt, a generation's chunks and text."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import pytest

from adapterctl.serve.engines.base import AdapterSpec, Chunk, Engine, GenerateRequest, Sampling

GREEDY = Sampling(max_tokens=12, temperature=0, ignore_eos=True)
# The vLLM engine as a parameter of an engine-parametrised fixture or test: marked, so that `-m "not vllm"` (make
# test-fast) starts no vLLM; the `vllm_engine` fixture skips where vLLM is not installed.
VLLM = pytest.param("vllm", marks=pytest.mark.vllm)
_numbers = itertools.count()


def request(
    engine: Engine, prompt: str | Sequence[int], adapter: AdapterSpec | None = None, sampling: Sampling = GREEDY
) -> GenerateRequest:
    """A generation of PROMPT (a text, or token ids as they are) with a request id no other request has."""
    ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
    return GenerateRequest(f"test-{next(_numbers)}", tuple(ids), adapter, sampling)


async def chunks(engine: Engine, generation: GenerateRequest) -> list[Chunk]:
    """Every chunk of GENERATION, in order."""
    return [chunk async for chunk in engine.generate(generation)]


async def text(engine: Engine, generation: GenerateRequest) -> str:
    """GENERATION's whole text."""
    return "".join(chunk.text for chunk in await chunks(engine, generation))


def tokens(found: Sequence[Chunk]) -> int:
    """Tokens generated over these chunks (as usage counts them)."""
    return sum(len(chunk.token_ids) for chunk in found)


def generate(engine: Engine, jobs: Sequence[tuple[AdapterSpec | None, str, Sampling, float]]) -> list[str]:
    """Run (adapter, prompt, sampling, start delay in seconds) jobs concurrently; their texts in job order."""

    async def one(adapter: AdapterSpec | None, prompt: str, sampling: Sampling, delay: float) -> str:
        await asyncio.sleep(delay)
        return await text(engine, request(engine, prompt, adapter, sampling))

    async def run() -> list[str]:
        return await asyncio.gather(*[one(*job) for job in jobs])

    return asyncio.run(run())


class Reader:
    """A generation read in the background as its chunks arrive (start it inside a running event loop)."""

    def __init__(self, engine: Engine, generation: GenerateRequest) -> None:
        self.request = generation
        self.chunks: list[Chunk] = []
        self.started = asyncio.Event()  # its first chunk came
        self.task = asyncio.ensure_future(self._read(engine))

    async def _read(self, engine: Engine) -> None:
        async for chunk in engine.generate(self.request):
            self.chunks.append(chunk)
            self.started.set()

    @property
    def tokens(self) -> int:
        """Tokens read so far."""
        return tokens(self.chunks)

    @property
    def text(self) -> str:
        """Text read so far."""
        return "".join(chunk.text for chunk in self.chunks)

    async def result(self) -> str:
        """The whole text, once the generation has ended (its error, if it failed)."""
        await self.task
        return self.text
