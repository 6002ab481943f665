"""`adapters serve --engine NAME`: the options each engine takes, checked before any model loads, and its build."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapterctl.core.errors import AdaptersError
from adapterctl.serve.engines.base import Engine

ENGINES = ("transformers", "vllm")


class ServeOptionError(AdaptersError):
    """An option of `adapters serve` that cannot work."""

    exit_code = 2


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """What `adapters serve` asks of its engine; None means the engine's default."""

    engine: str
    quantize: str
    max_loaded: int
    max_batch: int
    max_rank: int
    max_context: int
    dtype: str | None = None  # vLLM's compute dtype
    max_cpu_loras: int | None = None  # vLLM's cache of adapters in host memory
    prefill_chunk: int | None = None  # the transformers engine's prompt tokens per step
    max_batched_tokens: int | None = None  # the transformers engine's tokens per step's pass
    kv_cache_gb: float | None = None  # memory for keys and values

    def check(self) -> None:
        """Refuse options the chosen engine does not take, with one line that says what to do."""
        if self.engine == "transformers":
            for option, value in (("--dtype", self.dtype), ("--max-cpu-loras", self.max_cpu_loras)):
                if value is not None:
                    raise ServeOptionError(f"{option} is an option of the vLLM engine; add --engine vllm or drop it.")
        elif self.prefill_chunk is not None or self.max_batched_tokens is not None:  # vLLM schedules its own prefill
            option = "--prefill-chunk" if self.prefill_chunk is not None else "--max-batched-tokens"
            raise ServeOptionError(f"{option} is an option of the transformers engine; drop it with --engine vllm.")
        elif self.quantize != "none":  # vLLM 0.32 dropped bitsandbytes, so it has no NF4 or int8 with LoRA
            raise ServeOptionError(
                f"The vLLM engine cannot serve a --quantize {self.quantize} base (vLLM 0.32 has no bitsandbytes); "
                "use --quantize none, or --engine transformers, which serves nf4 and int8 bases."
            )
        if self.max_batched_tokens is not None and self.max_batched_tokens <= self.max_batch:
            raise ServeOptionError(  # the running rows' tokens alone would fill every pass: prompts would crawl
                f"--max-batched-tokens ({self.max_batched_tokens}) must be above --max-batch ({self.max_batch}): a "
                "step's pass holds every running stream's next token and parts of prompts."
            )
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loaded:
            raise ServeOptionError(
                f"--max-cpu-loras ({self.max_cpu_loras}) must be at least --max-loaded ({self.max_loaded})."
            )


def build(path: Path, model_id: str, options: EngineOptions) -> Engine:
    """The engine OPTIONS name, serving the base model at PATH."""
    if options.engine == "vllm":
        from adapterctl.serve.engines.vllm_engine import VLLMEngine

        return VLLMEngine(
            path,
            model_id=model_id,
            dtype=options.dtype or "bfloat16",
            max_loaded=options.max_loaded,
            max_cpu_loras=options.max_cpu_loras,
            max_batch=options.max_batch,
            max_rank=options.max_rank,
            max_context=options.max_context,
            kv_cache_gb=options.kv_cache_gb,
        )
    from adapterctl.serve.engines.transformers.engine import (
        KV_CACHE_GB,
        MAX_BATCHED_TOKENS,
        PREFILL_CHUNK,
        TransformersEngine,
    )

    return TransformersEngine(
        path,
        model_id=model_id,
        quantize=options.quantize,
        max_loaded=options.max_loaded,
        max_batch=options.max_batch,
        max_rank=options.max_rank,
        max_context=options.max_context,
        prefill_chunk=PREFILL_CHUNK if options.prefill_chunk is None else options.prefill_chunk,
        max_batched_tokens=options.max_batched_tokens or MAX_BATCHED_TOKENS,
        kv_cache_gb=options.kv_cache_gb or KV_CACHE_GB,
    )
