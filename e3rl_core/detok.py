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


def push(tokenizer: Any, state: DetokState, token_id: int) -> str:
    """Append a token; return the text it completes ("" while a character is still partial)."""
    state.ids.append(token_id)
    prefix = tokenizer.decode(state.ids[state.prefix_offset:state.read_offset], skip_special_tokens=False)
    full = tokenizer.decode(state.ids[state.prefix_offset:], skip_special_tokens=False)
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
