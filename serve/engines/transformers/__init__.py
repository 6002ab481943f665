"""The transformers engine: one base model, many LoRA adapters per batch, continuous batching on a block cache."""
