"""Reasoning-model input and output: chat prompts with the step-by-step instruction and
enable_thinking, exactly one BOS, answers read after </think> only, and segments that snap to the
blank line between reasoning steps. The tokenizers are byte-level BPE trained here with the
``tokenizers`` library, with chat templates written here in the style of Qwen3 (thinking switch),
Llama-3 (BOS in the template) and the DeepSeek-R1 distills (prompt ends inside <think>)."""
from __future__ import annotations

import pytest
import torch

from e3rl_core.generation.config import GenerationConfig, SegmentConfig
from e3rl_core.generation.generator import ErasableGenerator
from e3rl_core.generation.segmenter import make_segmenter
from e3rl_core.models import char_tokenizer
from e3rl_core.tasks.datasets import USER_TEMPLATE, DataError, render_prompt
from e3rl_core.tasks.rewards import extract_answer, for_prompt, is_correct, prompt_opens_think, reward

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
QUESTION = "What is 2 + 3?"
SENTENCES = [
    "What is 2 + 3? Let me think step by step.\n\nFirst, 2 + 3 = 5.\nSo the answer is 5.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "<think>\nOkay, the user asks a question. Wait, let me check.\n\nYes.\n</think>\n\nThe answer is \\boxed{5}.",
    "The quick brown fox jumps over the lazy dog. Compute the sum of the numbers 1 2 3 4 5 6 7 8 9 0.",
]

QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
R1_DISTILL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)


def _bpe_tokenizer(specials: list[str], template: str, *, bos: str | None, eos: str, add_bos: bool):
    """A byte-level BPE tokenizer trained on SENTENCES; ``add_bos``: its post-processor prepends BOS
    to every encoding, as Llama-3's and DeepSeek-R1's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   chat_template=template, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def qwen3():
    return _bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], QWEN3_TEMPLATE,
                          bos=None, eos="<|im_end|>", add_bos=False)


@pytest.fixture(scope="module")
def llama3():
    return _bpe_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>"], LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True)


@pytest.fixture(scope="module")
def r1_distill():
    return _bpe_tokenizer(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                           "<think>", "</think>"], R1_DISTILL_TEMPLATE,
                          bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", add_bos=True)


def _generator(tok, **overrides) -> ErasableGenerator:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    return ErasableGenerator(model, tok, GenerationConfig(max_new_tokens=4, **overrides))


# ------------------------------------------------------------------------------ BOS

@pytest.mark.parametrize("name", ["llama3", "r1_distill"])
def test_a_rendered_chat_prompt_has_exactly_one_bos(name, request):
    tok = request.getfixturevalue(name)
    prompt = render_prompt(QUESTION, tok)
    assert prompt.startswith(tok.bos_token)  # the template wrote the BOS ...
    assert tok(prompt)["input_ids"][:2] == [tok.bos_token_id] * 2  # ... and the tokenizer would add another
    gen = _generator(tok)
    ids = gen.encode(prompt)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    trace = gen.generate(prompt, seed=0)[0]
    assert trace.start.prompt_ids == ids  # what the model was fed


def test_plain_text_still_gets_its_bos(llama3):
    gen = _generator(llama3)
    ids = gen.encode("Let me think step by step.")
    assert ids[0] == llama3.bos_token_id and ids.count(llama3.bos_token_id) == 1
    demo = char_tokenizer()  # the shipped demo model's tokenizer: its prompts are tokenized as before
    plain = render_prompt(QUESTION, demo)
    assert ErasableGenerator.text_ids(_Tok(demo), plain) == demo(plain, add_special_tokens=True)["input_ids"]


class _Tok:  # text_ids needs only .tokenizer
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def test_qwen3_prompt_has_no_bos_and_is_tokenized_as_before(qwen3):
    prompt = render_prompt(QUESTION, qwen3)
    assert ErasableGenerator.text_ids(_Tok(qwen3), prompt) == qwen3(prompt, add_special_tokens=True)["input_ids"]


# ------------------------------------------------------------------------------ prompts

@pytest.mark.parametrize("name", ["qwen3", "llama3", "r1_distill"])
def test_chat_prompts_carry_the_instruction_after_the_question(name, request):
    tok = request.getfixturevalue(name)
    prompt = render_prompt(QUESTION, tok)
    assert f"{QUESTION}\n{INSTRUCTION}" in prompt
    assert USER_TEMPLATE == "{question}\n" + INSTRUCTION
    custom = render_prompt(QUESTION, tok, user_template="Solve: {question} Box it: \\boxed{}")
    assert "Solve: What is 2 + 3? Box it: \\boxed{}" in custom and INSTRUCTION not in custom


def test_plain_prompts_are_unchanged():
    for tok in (None, char_tokenizer()):
        assert render_prompt(QUESTION, tok) == f"Question: {QUESTION}\nAnswer:\n"


def test_enable_thinking_reaches_the_template(qwen3):
    default = render_prompt(QUESTION, qwen3)
    assert default.endswith("<|im_start|>assistant\n")  # the template's default: thinking on
    assert render_prompt(QUESTION, qwen3, enable_thinking=True) == default
    off = render_prompt(QUESTION, qwen3, enable_thinking=False)
    assert off == default + "<think>\n\n</think>\n\n"
    assert not prompt_opens_think(off) and not prompt_opens_think(default)


def test_bad_prompt_options_fail_with_a_clear_error(llama3):
    with pytest.raises(DataError, match="does not read it.*leave it unset"):
        render_prompt(QUESTION, llama3, enable_thinking=False)  # the Llama-3 template would ignore it
    with pytest.raises(DataError, match="has no chat template"):
        render_prompt(QUESTION, char_tokenizer(), enable_thinking=True)
    with pytest.raises(DataError, match=r"has no \{question\}"):
        render_prompt(QUESTION, llama3, user_template="Please reason step by step.")


# ------------------------------------------------------------------------------ answers

def test_answers_inside_the_think_block_are_ignored():
    trace = "<think>\nMaybe \\boxed{3}? Wait, no.\n</think>\n\nThe answer is \\boxed{5}."
    assert extract_answer(trace) == "5"
    assert is_correct(trace, "5") and not is_correct(trace, "3")
    # a tentative answer in the reasoning is no answer once the block is closed
    assert extract_answer("<think>\n\\boxed{3}\n</think>\n\nI am not sure.") is None
    assert extract_answer("<think>a</think> \\boxed{1} <think>b</think> \\boxed{2}") == "2"  # the last block
    assert extract_answer("Answer: 7 \\boxed{5}") == "5"  # no think block: the whole text, as before


def test_a_trace_still_thinking_has_no_answer():
    cut = "<think>\nFirst, 2 + 3 = 5, so \\boxed{5}. Let me double-check"
    assert extract_answer(cut) is None
    assert is_correct(cut, "5") is False and reward(cut, "5") == 0.0
    assert extract_answer("<think>a</think>\\boxed{1}\n<think>on second thought") is None  # reopened


def test_r1_distill_prompts_start_the_completion_inside_the_think_block(r1_distill):
    prompt = render_prompt(QUESTION, r1_distill)
    assert prompt.endswith("<｜Assistant｜><think>\n") and prompt_opens_think(prompt)
    answer_fn, checker = for_prompt(prompt)
    assert answer_fn("2 + 3 = 5, so \\boxed{5}") is None  # cut mid-thought: no closing tag yet
    assert checker("2 + 3 = 5, so \\boxed{5}", "5") is False
    assert answer_fn("\\boxed{4}? no.\n</think>\n\n\\boxed{5}") == "5"
    assert checker("\\boxed{4}? no.\n</think>\n\n\\boxed{5}", "5") is True


def test_think_tags_are_configurable():
    tags = ("<reasoning>", "</reasoning>")
    trace = "<reasoning>\\boxed{3}</reasoning> \\boxed{5}"
    assert extract_answer(trace, think=tags) == "5"
    assert extract_answer("<reasoning>\\boxed{3}", think=tags) is None
    assert extract_answer("<think>\\boxed{3}", think=None) == "3"  # None: the whole text, tags or not
    answer_fn, _ = for_prompt("<reasoning>\n", think=tags)
    assert answer_fn("\\boxed{3}") is None


# ------------------------------------------------------------------------------ segments

def test_fixed_segments_snap_to_blank_lines_between_reasoning_steps(qwen3):
    steps = ["First, 2 + 3 = 5.\nSo the sum is 5.", "Wait, let me check the sum.\nYes.",
             "The quick brown fox jumps.\nOkay.", "So the answer is 5."]
    text = "\n\n".join(steps)
    pieces = [qwen3.decode([i]) for i in qwen3(text, add_special_tokens=False)["input_ids"]]
    assert "".join(pieces) == text and "\n" in pieces  # byte-level BPE: "\n\n" arrives as two tokens here
    seg = make_segmenter(SegmentConfig(mode="fixed", segment_tokens=12, snap_to_newline=True, snap_window=11,
                                       snap_to="\n\n"))
    segments, cur, length = [], "", 0
    for piece in pieces:  # online, as the generator cuts
        cur, length = cur + piece, length + 1
        if seg.is_boundary(length, cur, piece):
            segments.append(cur)
            cur, length = "", 0
    segments.append(cur)
    assert segments == [s + "\n\n" for s in steps[:-1]] + [steps[-1]]  # one reasoning step per segment


# ------------------------------------------------------------------------------ command line

def _model_dir(tok, path):
    gen = _generator(tok)
    gen.model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_cli_generate_renders_one_bos_and_the_instruction(llama3, tmp_path, capsys):
    from e3rl_core.cli import main
    from e3rl_core.events import group_traces, read_events

    model = _model_dir(llama3, tmp_path / "llama3")
    out = tmp_path / "trace.jsonl"
    assert main(["generate", "--model", model, "--question", QUESTION, "--max-new-tokens", "4", "--device", "cpu",
                 "--trace-out", str(out)]) == 0
    start = group_traces(read_events(out))[0].start
    assert start.prompt_ids.count(llama3.bos_token_id) == 1 and INSTRUCTION in start.prompt
    # the Llama-3 template takes no enable_thinking: the flag is refused, not silently dropped
    assert main(["generate", "--model", model, "--question", QUESTION, "--enable-thinking", "--device", "cpu"]) == 2
    assert "leave it unset" in capsys.readouterr().err
    assert main(["generate", "--model", model, "--prompt", "hi", "--no-enable-thinking"]) == 2
    assert "--question" in capsys.readouterr().err


def test_cli_eval_passes_enable_thinking_to_the_template(qwen3, tmp_path):
    from e3rl_core.cli import main
    from e3rl_core.events import group_traces, read_events

    model = _model_dir(qwen3, tmp_path / "qwen3")
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "What is 2 + 3?", "answer": "5"}\n')
    traces = tmp_path / "traces.jsonl"
    assert main(["eval", "--model", model, "--data", f"jsonl:{data}", "--max-new-tokens", "4", "--device", "cpu",
                 "--no-enable-thinking", "--traces-out", str(traces), "--json"]) == 0
    prompt = group_traces(read_events(traces))[0].start.prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and INSTRUCTION in prompt
