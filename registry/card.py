"""Model cards: the Hugging Face metadata header and the PEFT loading snippet every adapter card shares."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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
