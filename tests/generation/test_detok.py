"""Incremental detokenization against full decodes: a byte-level BPE trained here (so characters it
never saw split into byte tokens, and merges can join the tail of one character to the start of the
next) and the shipped character tokenizer."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from e3rl_core.generation.detok import Decoder, DetokState, push, start_state
from e3rl_core.models import char_tokenizer

CORPUS = [
    "The café serves crème brûlée and a piña colada.",
    "Naïve résumé: 東京 is big, 日本語のテキスト too 😀",
    "Unicode mixes: Ωmega, Straße, 한국어, 😎 and ascii.",
] * 3
# Mostly characters the trainer never saw: each becomes 2-4 byte tokens.
TEXTS = ["café 東京 😀", "Zoë → 北京 🎉!", "ascii only, plain text.", "🎈🎉 ß Ω 한국 çà", "\n 😀😀 日本\n"]
ALPHABET = list("ab ,.\n") + list("éüßΩ北京語한국") + ["😀", "🎉", "🎈", "👍🏽"]


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _stream(tok, prompt_ids: list[int], ids: list[int], state: DetokState | None = None) -> list[str]:
    decode = Decoder(tok)
    state = state or start_state(prompt_ids)
    return [push(decode, state, t) for t in ids]


def _byte_ids(tok, text: str) -> list[int]:
    """One token per UTF-8 byte of ``text`` (a valid, if unmerged, sequence a model may sample),
    through GPT-2's byte-to-character table, which the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b], extra = chr(256 + extra), extra + 1
    vocab = tok.get_vocab()
    return [vocab[table[b]] for b in text.encode()]


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_stream_equals_full_decode_at_every_step(bpe, text):
    prompt = _enc(bpe, "Q: say it. A:")
    ids = _enc(bpe, text)
    deltas = _stream(bpe, prompt, ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    prompt_text = bpe.decode(prompt)
    for i in range(len(ids)):
        so_far = "".join(deltas[: i + 1])
        full = bpe.decode(prompt + ids[: i + 1])[len(prompt_text):]
        # Never ahead of the full decode; level with it whenever no character is left partial. (A
        # token that ends one character and starts the next holds back the first until the second
        # completes, as in vLLM's and TGI's streamers.)
        assert full.startswith(so_far)
        if not full.endswith("\ufffd"):
            assert so_far == full


def test_bpe_splits_characters_across_tokens(bpe):
    # The premise of the tests above: some tokens are only part of a character.
    ids = _enc(bpe, "🎉 北京")
    assert len(ids) > 3
    assert any("\ufffd" in bpe.decode([i]) for i in ids)
    assert "" in _stream(bpe, [], ids)


def test_bpe_random_texts_and_long_streams_keep_a_short_window(bpe):
    rng = random.Random(0)
    decode = Decoder(bpe)
    for _ in range(20):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 120)))
        ids = _enc(bpe, text)
        state = start_state(_enc(bpe, "prompt: "))
        out, longest = [], 0
        for t in ids:
            out.append(push(decode, state, t))
            longest = max(longest, len(state.ids))
        assert "".join(out) == text
        # Only the ids from prefix_offset on are ever decoded, so the window never grows with the text.
        assert longest <= 33 + 4, (longest, len(ids))


def test_start_state_keeps_the_prompt_tail():
    state = start_state(list(range(10)))
    assert state == DetokState(ids=[4, 5, 6, 7, 8, 9], prefix_offset=0, read_offset=6)
    assert start_state([1, 2], context=6) == DetokState([1, 2], 0, 2)
    assert start_state([], context=6) == DetokState([], 0, 0)


def test_char_tokenizer_streams_one_character_per_token():
    tok = char_tokenizer()
    prompt = tok("2+2=").input_ids  # starts with <bos>
    assert prompt[0] == tok.bos_token_id
    text = "4, since 2 + 2 = 4.\nDone!"
    ids = _enc(tok, text)
    assert len(ids) == len(text)
    deltas = _stream(tok, prompt, ids + [tok.eos_token_id])
    assert deltas[:-1] == list(text)
    # Specials are not skipped: the stream matches decode(..., skip_special_tokens=False).
    assert "".join(deltas) == tok.decode(ids + [tok.eos_token_id], skip_special_tokens=False)


def _erase_and_retry(tok, prefix: list[int], first: list[int], retry: list[int]) -> tuple[str, DetokState]:
    """The generator's erasure: copy the state at the segment start, decode an attempt, then
    continue from a fresh copy of the saved state. Returns the text kept and the saved state."""
    decode = Decoder(tok)
    state = start_state([])
    kept = "".join(push(decode, state, t) for t in prefix)
    saved = state.copy()
    snapshot = (list(saved.ids), saved.prefix_offset, saved.read_offset)
    for t in first:
        push(decode, state, t)
    assert (saved.ids, saved.prefix_offset, saved.read_offset) == snapshot  # decoding never touched it
    state = saved.copy()
    kept += "".join(push(decode, state, t) for t in retry)
    return kept, saved


def test_restart_from_a_copy_forgets_the_erased_attempt(bpe):
    prefix = _enc(bpe, "The café: ")
    kept, _ = _erase_and_retry(bpe, prefix, _enc(bpe, "北京 🎉 wrong"), _enc(bpe, "東京 😀 right"))
    assert kept == bpe.decode(prefix + _enc(bpe, "東京 😀 right"))


def test_restart_in_the_middle_of_a_character(bpe):
    party, balloon = _byte_ids(bpe, "🎉"), _byte_ids(bpe, "🎈")
    assert bpe.decode(party) == "🎉" and party[:3] == balloon[:3]  # bytes F0 9F 8E are shared
    prefix = _enc(bpe, "ok ") + party[:2]  # the segment boundary falls inside the emoji
    kept, saved = _erase_and_retry(bpe, prefix, party[2:] + _enc(bpe, " no"), balloon[2:] + _enc(bpe, " yes"))
    assert saved.read_offset < len(saved.ids)  # the saved state holds the pending bytes
    assert kept == "ok 🎈 yes"


def test_restart_after_the_window_was_cut(bpe):
    prefix = _enc(bpe, "😀" * 30 + " and then ")
    assert len(prefix) > 40
    kept, saved = _erase_and_retry(bpe, prefix, _enc(bpe, "Ω北"), _enc(bpe, "한국 ß"))
    assert len(saved.ids) < len(prefix)
    assert kept == "😀" * 30 + " and then 한국 ß"


class _CountingTokenizer:
    def __init__(self, tok) -> None:
        self.tok, self.calls = tok, 0

    def decode(self, ids, skip_special_tokens=False):
        self.calls += 1
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decoder_memoizes_and_bounds_its_memo(bpe):
    counting = _CountingTokenizer(bpe)
    decode = Decoder(counting, max_entries=2)
    windows = [_enc(bpe, w) for w in ("café", "東京", "😀")]
    assert decode(windows[0]) == "café" and counting.calls == 1
    assert decode(windows[0]) == "café" and counting.calls == 1  # a hit: no tokenizer call
    assert decode(windows[1]) == "東京" and counting.calls == 2
    assert decode(windows[2]) == "😀" and counting.calls == 3
    assert len(decode.memo) <= 2
    assert decode(windows[0]) == "café"  # evicted entries decode again, correctly
