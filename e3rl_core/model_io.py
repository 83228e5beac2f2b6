"""Loading a causal LM and its tokenizer, from a local directory or (online) a hub id, with errors
that say what to do."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ModelLoadError

if TYPE_CHECKING:  # annotations only; config imports nothing heavy, but keep this module's imports minimal
    from .config import GenerationConfig

RECOMMENDED_CONFIG = "e3rl_generation.json"

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path.
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/")


def _is_causal_lm(config: Any) -> bool:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # layout changed: let from_pretrained decide
        return True
    archs = getattr(config, "architectures", None) or []
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or any("CausalLM" in a for a in archs)


def load_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as err:  # transformers raises OSError, ValueError or TypeError here
        raise ModelLoadError(
            f"no usable tokenizer in {spec!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            f"save one next to the model with tokenizer.save_pretrained({spec!r})"
        ) from None
    if not getattr(tok, "is_fast", False) and not hasattr(tok, "decode"):
        raise ModelLoadError(f"the tokenizer in {spec!r} cannot decode; save a fast tokenizer there")
    return tok


def load_model(
    spec: str, *, device: str | None = None, dtype: str = "auto", attn_implementation: str | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) from a directory with config.json, weights and tokenizer files, or a hub id.

    ``random:<preset>`` builds a random-init model instead (see ``e3rl_core.tiny.PRESETS``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.startswith("random:"):
        from .tiny import PRESETS, random_model

        preset = spec.split(":", 1)[1]
        if preset not in PRESETS:
            raise ModelLoadError(f"unknown random preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        model, tok = random_model(preset)
        return model.to(device or "cpu"), tok
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{spec} is a file; pass the directory that holds config.json and the weights")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{spec} has no config.json; pass a directory written by model.save_pretrained(...)"
            )
        spec = str(path)
    elif _looks_like_path(spec):
        raise ModelLoadError(
            f"model directory not found: {spec}; pass a directory with config.json, weights and tokenizer, "
            f"or a hub id such as Qwen/Qwen3-4B when online"
        )
    try:
        config = AutoConfig.from_pretrained(spec)
    except Exception as err:
        raise ModelLoadError(
            f"could not load a model config from {spec!r} ({str(err).splitlines()[0][:200]}); "
            f"check the path or hub id (hub ids need network access)"
        ) from None
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(
            f"{spec} holds a {config.model_type} encoder-decoder model; E3RL needs a decoder-only causal LM"
        )
    if not _is_causal_lm(config):
        raise ModelLoadError(
            f"{spec} holds a {config.model_type} model, which is not a causal language model; "
            f"pass a decoder-only LM (Llama, Qwen2/3, Mistral, GPT-2, ...)"
        )
    tokenizer = load_tokenizer(spec)
    kwargs: dict[str, Any] = {"dtype": DTYPES.get(dtype, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ModelLoadError(
                f"{spec} holds a {config.model_type} model, which is not a causal language model; "
                f"pass a decoder-only LM (Llama, Qwen2/3, Mistral, GPT-2, ...)"
            ) from None
        raise ModelLoadError(f"could not load the model in {spec}: {err}") from None
    except OSError as err:
        raise ModelLoadError(f"could not load the weights in {spec}: {str(err).splitlines()[0][:300]}") from None
    model.eval()
    if device:
        model.to(device)
    elif torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer


def recommended_config(spec: str) -> GenerationConfig:
    """The generation settings a model directory recommends (``e3rl_generation.json``, written
    with its model card), else the defaults. Command-line flags override either."""
    import json

    from .config import GenerationConfig
    from .errors import ConfigError

    path = Path(spec).expanduser() / RECOMMENDED_CONFIG
    if not path.is_file():
        return GenerationConfig()
    try:
        return GenerationConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ConfigError) as err:
        raise ModelLoadError(f"{path} is not a valid generation config ({err}); fix or delete it") from None
