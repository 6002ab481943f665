"""Model cards: the Hugging Face metadata header and the PEFT loading snippet every adapter card shares."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.core.precision import Precision

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

METHODS = {"lora": "LoRA", "qlora": "QLoRA"}


def card_data(
    adapter: str, method: str, base_model: str | None, dataset_file: str | None, eval_loss: float | None
) -> ModelCardData:
    """The Hub metadata of an adapter's model card: base_model, library_name: peft, tags, datasets, eval loss."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset_name = Path(dataset_file).stem if dataset_file else None
    results = []
    if eval_loss is not None and dataset_name:
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset_name,
                dataset_name=dataset_name,
                metric_type="loss",
                metric_name="eval loss",
                metric_value=round(eval_loss, 4),
            )
        )
    return ModelCardData(
        base_model=base_model,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=[method, "lora", "peft", "adapters"],
        datasets=[dataset_name] if dataset_name else None,
        metrics=["loss"],
        model_name=adapter,
        eval_results=results or None,
    )


def peft_snippet(base_id: str, source: str, revision: str | None = None) -> str:
    """A fenced Python block that loads the adapter at SOURCE onto BASE_ID with PEFT."""
    pinned = f', revision="{revision}"' if revision else ""
    return f"""```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base_id}")
model = PeftModel.from_pretrained(base, "{source}"{pinned})
```"""


def render(data: ModelCardData, body: str) -> str:
    """A whole card: the YAML metadata header, then the Markdown body."""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def precision_section(precision: dict[str, Any] | None, fidelity: dict[str, Any] | None) -> str:
    """A Markdown section: the base precision the adapter was trained against and its measured fidelity."""
    trained = Precision.from_lineage(precision)
    lines = ["## Precision", ""]
    if not trained.known:
        lines.append("The precision of the base it was trained against is not recorded (unknown).")
    else:
        lines += [
            f"Trained against the base held as **{trained.describe()}**. An adapter learns a correction to the",
            f"exact weights it saw: serve it on the same precision (`adapters serve --quantize {trained.quantize}`).",
        ]
    figures = (fidelity or {}).get("precisions") or {}
    if figures:
        lines += [
            "",
            f"Fidelity: the share of its eval-loss improvement kept on each serving precision "
            f"({fidelity.get('eval_examples')} eval examples, measured when it was trained).",
            "",
            "| precision | base loss | adapter loss | fidelity |",
            "|---|---|---|---|",
        ]
        for quantize, row in figures.items():
            share = row.get("fidelity")
            lines.append(
                f"| {quantize} | {row.get('base_loss', 'n/a')} | {row.get('adapter_loss', 'n/a')} | "
                f"{'n/a' if share is None else f'{share:.0%}'} |"
            )
    return "\n".join(lines) + "\n"
