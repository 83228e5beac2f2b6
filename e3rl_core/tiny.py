"""Small models and a character tokenizer built locally from configs, with no download.

Used by the tests (random-init Llama and Qwen2), by ``e3rl bench`` (``random:<preset>`` model
specs) and as the starting point of the shipped demo model.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

# name -> (model_type, config overrides). Sizes: tiny for tests, small ~ the shipped demo model,
# qwen3-0.6b with Qwen3-0.6B's shapes (for GPU measurements; slow on a CPU).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)),
    "tiny-qwen2": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)),
    "small": ("llama", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4)),
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 vocab_size=151936, tie_word_embeddings=True)),
}


def char_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character and newline, plus <pad> <bos> <eos> <unk>.

    ``vocab_size`` pads the vocabulary with unused ``<x{i}>`` tokens to match a larger model."""
    chars = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    for i in range(len(vocab), vocab_size or 0):
        vocab[f"<x{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def random_model(preset: str = "tiny-llama", *, seed: int = 0, max_positions: int = 2048,
                 init_std: float = 0.02, vocab_size: int | None = None) -> tuple[Any, PreTrainedTokenizerFast]:
    """A random-init causal LM (eval mode) and a matching character tokenizer."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    model_type, overrides = PRESETS[preset]
    tokenizer = char_tokenizer()
    vocab = vocab_size or overrides.get("vocab_size", len(tokenizer))
    if vocab > len(tokenizer):
        tokenizer = char_tokenizer(vocab)
    kwargs = dict(overrides, vocab_size=vocab, max_position_embeddings=max_positions,
                  initializer_range=init_std, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model, tokenizer


def save_random_model(path: str | Path, preset: str = "tiny-llama", **kwargs: Any) -> Path:
    """Write a random-init model + tokenizer loadable by ``from_pretrained``."""
    model, tokenizer = random_model(preset, **kwargs)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
