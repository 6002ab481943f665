"""The causal LM loss from the last hidden states, the LM head applied a chunk of answer tokens at a time.

The plain loss keeps the logits of every position of the batch (batch x seq-len x a 49k vocabulary in float32: 400 MB
at batch 8 x 256 on SmolLM2) and their softmax for the backward pass. Here the model returns its last hidden states,
only the positions with a label are scored, and each chunk's logits are recomputed in the backward pass instead of
kept: the same loss and gradients, within float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

from adapterctl.train.data import IGNORE_INDEX

CHUNK_TOKENS = 256  # logits held at once: 256 x 49k vocabulary x 4 bytes = 50 MB, and as much for their gradient


class HiddenStates(nn.Module):
    """Stands in for the LM head in training: the model's `logits` are its last hidden states, scored by the loss."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk of positions; logits in float32 as transformers' own loss takes them."""
    return functional.cross_entropy(head(hidden).float(), labels, reduction="sum")


class ChunkedLoss:
    """A Trainer `compute_loss_func` that scores hidden states through the model's LM head, chunk by chunk."""

    def __init__(self, model: nn.Module) -> None:
        """Swap the model's LM head for `HiddenStates` (LoRA never wraps the head) and keep the head for scoring."""
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.head = causal_lm.get_output_embeddings()
        causal_lm.set_output_embeddings(HiddenStates(self.head))

    def __call__(
        self, outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """The loss transformers' ForCausalLMLoss gives: summed over answer tokens, divided by their count in the
        whole (accumulated) batch when the Trainer passes it, else the mean."""
        hidden = outputs.logits[:, :-1]  # position t predicts token t + 1
        targets = labels[:, 1:].to(hidden.device)
        scored = targets != IGNORE_INDEX
        hidden, targets = hidden[scored], targets[scored]
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), CHUNK_TOKENS):
            chunk = slice(start, start + CHUNK_TOKENS)
            total = total + checkpoint(_chunk_loss, self.head, hidden[chunk], targets[chunk], use_reentrant=False)
        if num_items_in_batch is None:
            return total / targets.numel()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
