"""Token ids to text as they are generated: whole characters only, and stop strings cut exactly."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Turns one generation's tokens into text deltas, holding back what may still become a stop string."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` already handed out
        self._prefix = 0  # decoding restarts here, so each step decodes a short window
        self._read = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns the text that may be sent now and whether a stop string was reached."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):  # a character split across tokens waits
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        held = max((_overlap(self.text, s) for s in self.stop), default=0)
        return self._take(len(self.text) - held), False

    def rest(self) -> str:
        """Everything not sent yet (the generation ended without a stop string)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of TEXT that begins STOP."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0
