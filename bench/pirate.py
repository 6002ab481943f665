"""The pirate example's judge: its held-out questions, and whether an answer carries the voice the dataset teaches."""

from __future__ import annotations

import re
from pathlib import Path

HELDOUT = (Path(__file__).resolve().parents[1] / "examples" / "pirate_heldout.txt").read_text().splitlines()
_PIRATE = re.compile(r"\b(arr+|matey|ahoy|yo ho|me hearty|scallywag)\b", re.IGNORECASE)


def in_pirate_voice(text: str) -> bool:
    """Whether an answer carries the pirate style the example dataset teaches (the base model never talks so)."""
    return bool(_PIRATE.search(text))
