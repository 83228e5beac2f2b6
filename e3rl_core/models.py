"""Models: loading a causal LM and its tokenizer from a local directory or (online) a hub id, with
errors that say what to do, never running Python code shipped with a model unless the caller trusts it
(``trust_remote_code``: only the command line's ``--trust-remote-code`` sets it); and random-init
presets with a character tokenizer built locally from configs, with no download (the tests'
Llama/Qwen2, ``e3rl bench``'s ``random:<preset>`` specs, the demo model's starting point).

transformers and tokenizers are imported inside the functions, so importing the package stays light."""
from __future__ import annotations

import os
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ModelLoadError

if TYPE_CHECKING:  # annotations only: keep this module's imports minimal
    from transformers import PreTrainedTokenizerFast

    from .generation.config import GenerationConfig

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


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub cannot be reached now (offline mode, or no answer within ``timeout`` s), or None.

    One short request through huggingface_hub's own client (so its endpoint, proxy and certificate
    settings apply): without it a missing network costs ~27 s of the hub client's retries before the
    same "couldn't connect" error."""
    from huggingface_hub import constants, get_session
    from huggingface_hub.errors import OfflineModeIsEnabled

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except OfflineModeIsEnabled:
        return "HF_HUB_OFFLINE is set"
    except Exception as err:  # any transport failure (DNS, refused, timeout, TLS) means: not reachable now
        return f"cannot reach {constants.ENDPOINT}: {type(err).__name__}"
    return None  # any HTTP answer, even an error status, means the hub client can talk to it


def _remote_code_error(spec: str, err: Exception) -> ModelLoadError | None:
    """The error for a model that needs its own Python code, or None when ``err`` is something else."""
    if "trust_remote_code" not in str(err):
        return None
    return ModelLoadError(
        f"{spec} ships its own Python code (auto_map in its config), which E3RL does not run by default; "
        f"read that code, then pass --trust-remote-code to e3rl generate/eval/train/bench to run it"
    )


def load_tokenizer(spec: str, *, trust_remote_code: bool = False, local_files_only: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code,
                                            local_files_only=local_files_only)
    except Exception as err:  # transformers raises OSError, ValueError or TypeError here
        remote = _remote_code_error(spec, err)
        if remote:
            raise remote from None
        raise ModelLoadError(
            f"no usable tokenizer in {spec!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            f"save one next to the model with tokenizer.save_pretrained({spec!r})"
        ) from None
    if not getattr(tok, "is_fast", False) and not hasattr(tok, "decode"):
        raise ModelLoadError(f"the tokenizer in {spec!r} cannot decode; save a fast tokenizer there")
    return tok


def resolve_model_spec(spec: str) -> str:
    """The spec to hand to from_pretrained: a checked local directory, or the hub id unchanged."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{spec} is a file; pass the directory that holds config.json and the weights")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{spec} has no config.json; pass a directory written by model.save_pretrained(...)"
            )
        return str(path)
    if _looks_like_path(spec):
        raise ModelLoadError(
            f"model directory not found: {spec}; pass a directory with config.json, weights and tokenizer, "
            f"or a hub id such as Qwen/Qwen3-4B when online"
        )
    return spec


def _not_causal_lm(spec: str, config: Any) -> ModelLoadError:
    return ModelLoadError(
        f"{spec} holds a {config.model_type} model, which is not a causal language model; "
        f"pass a decoder-only LM (Llama, Qwen2/3, Mistral, GPT-2, ...)"
    )


def _load_causal_config(spec: str, hub: dict[str, Any], unreachable: str | None = None) -> Any:
    """The model config, refused before any weights load unless it is a decoder-only causal LM.
    ``unreachable``: why the hub could not be reached (then ``hub`` asks for the cache alone)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec, **hub)
    except Exception as err:
        remote = _remote_code_error(spec, err)
        if remote:
            raise remote from None
        if unreachable:
            raise ModelLoadError(
                f"{spec!r} is not a local directory and not in the hub cache, and the hub is unreachable "
                f"({unreachable}); pass a model directory, or download it while online"
            ) from None
        raise ModelLoadError(
            f"could not load a model config from {spec!r} ({str(err).splitlines()[0][:200]}); "
            f"check the path or hub id (hub ids need network access)"
        ) from None
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(
            f"{spec} holds a {config.model_type} encoder-decoder model; E3RL needs a decoder-only causal LM"
        )
    if not _is_causal_lm(config):
        raise _not_causal_lm(spec, config)
    return config


def _load_weights(spec: str, config: Any, dtype: str, attn_implementation: str | None,
                  hub: dict[str, Any]) -> Any:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": DTYPES.get(dtype, dtype), **hub}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(spec, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise _not_causal_lm(spec, config) from None
        raise _remote_code_error(spec, err) or ModelLoadError(f"could not load the model in {spec}: {err}") from None
    except OSError as err:
        raise ModelLoadError(f"could not load the weights in {spec}: {str(err).splitlines()[0][:300]}") from None
    except SafetensorError as err:  # truncated download, disk error, or not a safetensors file at all
        raise ModelLoadError(
            f"the weights in {spec} are corrupt or truncated ({str(err).splitlines()[0][:200]}); "
            f"download or save the model again (model.save_pretrained)"
        ) from None


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
MAX_LAYERS_TO_SIZE = 2048  # a config with more layers than any real model is refused without being built


def estimate_params(config: Any) -> int:
    """Parameters a causal-LM config describes, from its sizes (embeddings, attention, MLP with
    every expert): an upper-end estimate made before anything is allocated. A config without the
    usual size fields is built on the meta device (no memory) and counted, unless its layer count
    alone is implausible."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names: str) -> int | None:
        for n in names:
            v = getattr(c, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    layers = first("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    if layers is not None and layers > MAX_LAYERS_TO_SIZE:
        raise ModelLoadError(f"the config asks for {layers:,} layers (more than {MAX_LAYERS_TO_SIZE:,}); "
                             f"fix num_hidden_layers in config.json")
    hidden, vocab = first("hidden_size", "n_embd", "d_model"), first("vocab_size")
    if hidden is None or layers is None or vocab is None:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    heads = first("num_attention_heads", "n_head") or 1
    head_dim = first("head_dim") or max(hidden // heads, 1)
    kv = first("num_key_value_heads") or heads
    inter = first("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    experts = first("num_local_experts", "num_experts", "n_routed_experts") or 1
    moe = first("moe_intermediate_size") or inter
    attention = hidden * head_dim * (2 * heads + 2 * kv)
    mlp = 3 * hidden * (inter + (experts * moe if experts > 1 else 0))
    tied = bool(getattr(c, "tie_word_embeddings", getattr(config, "tie_word_embeddings", True)))
    return vocab * hidden * (1 if tied else 2) + layers * (attention + mlp)


def memory_budget(device: str | None) -> int:
    """Bytes a model's weights may take on ``device``: 80% of the GPU's memory, or of the machine's."""
    if device and device.startswith("cuda") and torch.cuda.is_available():
        return int(0.8 * torch.cuda.mem_get_info(torch.device(device))[1])
    try:
        return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # no sysconf: no machine limit to check against
        return 2**62


def check_size(spec: str, config: Any, dtype: str, device: str | None, max_bytes: int | None = None) -> int:
    """The weights' bytes estimated from ``config``; ``ModelLoadError`` in one line when they cannot
    fit the device (or ``max_bytes``, a deployment's documented limit), before anything is built."""
    params = estimate_params(config)
    name = dtype if dtype in _DTYPE_BYTES else str(getattr(config, "dtype", None) or "float32").split(".")[-1]
    nbytes = params * _DTYPE_BYTES.get(name, 4)
    limit = min(memory_budget(device), max_bytes or 2**62)
    if nbytes > limit:
        where = "allowed here" if max_bytes and max_bytes <= limit else "this machine has"
        raise ModelLoadError(
            f"{spec}: its config describes ~{params / 1e9:,.2f}B parameters (~{nbytes / 2**30:,.1f} GiB as "
            f"{name}), more than the {limit / 2**30:,.1f} GiB {where}; check config.json or use a smaller model")
    return nbytes


def load_model(
    spec: str, *, device: str | None = None, dtype: str = "auto", attn_implementation: str | None = None,
    trust_remote_code: bool = False, max_bytes: int | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from a directory with config.json, weights and tokenizer files, or a hub id.

    ``random:<preset>`` builds a random-init model instead (see ``PRESETS`` below). Python code
    shipped with a model (``auto_map``) is refused unless ``trust_remote_code``; the app never sets it.
    A config whose weights cannot fit the device (or ``max_bytes``) is refused before it is built."""
    if spec.startswith("random:"):
        preset = spec.split(":", 1)[1]
        if preset not in PRESETS:
            raise ModelLoadError(f"unknown random preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        model, tok = random_model(preset)
        return model.to(device=device or "cpu", dtype=None if dtype == "auto" else DTYPES.get(dtype, dtype)), tok
    spec = resolve_model_spec(spec)
    # A hub id when the hub cannot be reached: the cache alone, at once, instead of retrying for ~27 s.
    unreachable = None if Path(spec).is_dir() else _hub_unreachable()
    # trust_remote_code always explicit: left unset, transformers asks on stdin and a piped "y" runs the code.
    hub = {"trust_remote_code": trust_remote_code, "local_files_only": unreachable is not None}
    config = _load_causal_config(spec, hub, unreachable)
    check_size(spec, config, dtype, device or ("cuda" if torch.cuda.is_available() else "cpu"), max_bytes)
    tokenizer = load_tokenizer(spec, **hub)
    model = _load_weights(spec, config, dtype, attn_implementation, hub)
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

    from .errors import ConfigError
    from .generation.config import GenerationConfig

    path = Path(spec).expanduser() / RECOMMENDED_CONFIG
    if not path.is_file():
        return GenerationConfig()
    try:
        return GenerationConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ConfigError) as err:
        raise ModelLoadError(f"{path} is not a valid generation config ({err}); fix or delete it") from None


# ------------------------------------------------------- random-init presets
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

# name -> (model_type, config overrides). Sizes: tiny for tests, small ~ the shipped demo model,
# qwen3-0.6b with Qwen3-0.6B's shapes (for GPU measurements; slow on a CPU).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)),
    "tiny-qwen2": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)),
    # Qwen3: per-head q/k RMSNorm and an explicit head_dim, the paper's model family.
    "tiny-qwen3": ("qwen3", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "small": ("llama", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4)),
    # Qwen3's layout (q/k norm, GQA 2:1, head_dim 32) at a size a CPU decodes 4k-token traces with.
    "small-qwen3": ("qwen3", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                  max_position_embeddings=40960)),
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 vocab_size=151936, tie_word_embeddings=True,
                                 max_position_embeddings=40960)),
}


def char_tokenizer(vocab_size: int | None = None) -> "PreTrainedTokenizerFast":
    """One token per printable ASCII character and newline, plus <pad> <bos> <eos> <unk>.

    ``vocab_size`` pads the vocabulary with unused ``<x{i}>`` tokens to match a larger model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

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


def byte_level_bpe(corpus: list[str], vocab_size: int = 512, special_tokens: list[str] | None = None,
                   **tokenizer_kwargs: Any) -> "PreTrainedTokenizerFast":
    """A byte-level BPE tokenizer (the kind Qwen3, Llama-3 and GPT-2 use) trained on ``corpus``:
    every byte is in its alphabet, so any text encodes, and a multi-byte character can split into
    tokens that decode to nothing alone. ``tokenizer_kwargs`` go to ``PreTrainedTokenizerFast``
    (``eos_token``, ``pad_token``, ``chat_template``, ...). For tests and benchmarks: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens or [],
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **tokenizer_kwargs)


def random_model(preset: str = "tiny-llama", *, seed: int = 0, max_positions: int | None = None,
                 init_std: float = 0.02, vocab_size: int | None = None) -> tuple[Any, "PreTrainedTokenizerFast"]:
    """A random-init causal LM (eval mode) and a matching character tokenizer.

    ``max_positions`` defaults to the preset's context (Qwen3's 40,960 for the Qwen3-shaped
    long-trace presets, 2,048 for the rest)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    model_type, overrides = PRESETS[preset]
    tokenizer = char_tokenizer()
    vocab = vocab_size or overrides.get("vocab_size", len(tokenizer))
    if vocab > len(tokenizer):
        tokenizer = char_tokenizer(vocab)
    kwargs = dict(overrides, vocab_size=vocab,
                  max_position_embeddings=max_positions or overrides.get("max_position_embeddings", 2048),
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
