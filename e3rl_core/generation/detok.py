"""Incremental detokenization: the text each new token adds, correct for byte-level BPE and
SentencePiece alike (a token's text can depend on its neighbours, and a multi-byte character can
span tokens). Decodes a short window, as vLLM's and TGI's streamers do, so the cost per token does
not grow with the sequence."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class DetokState:
    ids: list[int]
    prefix_offset: int
    read_offset: int

    def copy(self) -> "DetokState":
        return DetokState(list(self.ids), self.prefix_offset, self.read_offset)


def start_state(context_ids: list[int], context: int = 6) -> DetokState:
    """State seeded with the last few prompt tokens, which fix the first token's leading space."""
    ids = list(context_ids[-context:])
    return DetokState(ids=ids, prefix_offset=0, read_offset=len(ids))


class Decoder:
    """``tokenizer.decode`` of short id windows, memoized: the same few-token windows recur
    constantly, and a dict hit costs far less than a call into the tokenizer."""

    def __init__(self, tokenizer: Any, max_entries: int = 1 << 16) -> None:
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self.memo: dict[tuple[int, ...], str] = {}

    def __call__(self, ids: list[int]) -> str:
        key = tuple(ids)
        text = self.memo.get(key)
        if text is None:
            if len(self.memo) >= self.max_entries:
                self.memo.clear()
            text = self.memo[key] = self.tokenizer.decode(ids, skip_special_tokens=False)
        return text


def push(decode: Decoder, state: DetokState, token_id: int) -> str:
    """Append a token; return the text it completes ("" while a character is still partial)."""
    state.ids.append(token_id)
    prefix = decode(state.ids[state.prefix_offset:state.read_offset])
    full = decode(state.ids[state.prefix_offset:])
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        state.prefix_offset = state.read_offset
        state.read_offset = len(state.ids)
        # Keep the window short: only the ids from prefix_offset on are ever decoded.
        if state.prefix_offset > 32:
            cut = state.prefix_offset
            state.ids = state.ids[cut:]
            state.prefix_offset -= cut
            state.read_offset -= cut
        return full[len(prefix):]
    return ""
