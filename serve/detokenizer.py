"""Incremental detokenization and stop strings for streaming.

Decoding token by token breaks multi-byte characters (a byte-level BPE splits "ção" across tokens) and drops the
leading space that SentencePiece tokenizers attach to a word. So each step decodes a small window that starts a few
tokens back, and emits only what the window adds once it no longer ends in a replacement character.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        # The prompt's last tokens give the first generated token its real surroundings (leading spaces).
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end) once generation stops."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class StopStringMatcher:
    """Finds stop strings in streamed text and holds back a tail that could still become one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._text = ""
        self._emitted = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add `delta`; return the text now safe to emit and whether a stop string was hit."""
        start = len(self._text)
        self._text += delta
        hit = -1
        for stop in self._stops:
            pos = self._text.find(stop, max(0, start - len(stop) + 1))
            if pos != -1 and (hit == -1 or pos < hit):
                hit = pos
        if hit != -1:
            self._text = self._text[:hit]
            return self._take(len(self._text)), True
        return self._take(len(self._text) - self._held_back()), False

    def finish(self) -> str:
        """Generation ended for another reason: the held-back tail was not a stop string after all."""
        return self._take(len(self._text))

    def _held_back(self) -> int:
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _take(self, end: int) -> str:
        end = max(end, self._emitted)
        out = self._text[self._emitted : end]
        self._emitted = end
        return out
