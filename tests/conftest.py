"""Shared fixtures: a tiny randomly initialised Llama with a character-level tokenizer (no Hub access)."""

from __future__ import annotations

import json
import os
import string

import pytest

# Idle OpenMP threads sleep instead of spinning: on a 2-core machine spinning threads steal the cores
# that subprocesses and other threads need, and inflate the CPU time the fast-lane budget below reads.
# (Read once, when torch's OpenMP runtime starts: before the import.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.add_special_tokens({"additional_special_tokens": specials})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).to(dtype)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random Llama + char tokenizer, loadable with from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def char_tokenizer():
    return build_char_tokenizer()


def write_prompts(path, n: int):
    """A JSONL prompts file of ``n`` rows ``{"id": "p<i>", "question": "say <i>"}``."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "question": f"say {i}"}) + "\n")
    return path


@pytest.fixture
def prompts_file(tmp_path):
    """40 toy prompts (modules that need another size override this fixture with write_prompts)."""
    return write_prompts(tmp_path / "prompts.jsonl", 40)


TINY_RUN = {
    "seed": 0,
    "steps": 6,
    "threads": 2,
    "model.logprob_chunk_size": 16,
    "sampling.max_tokens": 6,
    "sampling.temperature": 1.0,
    "engine.kind": "transformers",
    "task.name": "dataset",
    "task.columns": {"prompt": "question", "prompt_id": "id"},
    "task.reward": "toy_rewards:digit_fraction",
    "task.system_prompt": None,
    "rollout.group_size": 4,
    "rollout.prompts_per_step": 4,
    "rollout.prompts_per_generate": 4,
    "rollout.sync_interval": 2,
    "rollout.asynchronous": False,
    "rollout.buffer_groups": 16,
    "optim.lr": 1e-2,
    "optim.micro_batch_size": 16,
    "eval.at_start": False,
    "eval.at_end": False,
    "logging.progress": False,
    "checkpoint.save_final": False,
}


def tiny_config(tiny_model_dir, prompts_file, out, **over):
    """The test suite's one small run: the tiny Llama on the toy prompts file, synchronous, 6 steps of
    4 prompts x 4 responses of <= 6 tokens. ``over`` are dotted ``key: value`` overrides."""
    from oapl.config import load_config

    tree = {"output_dir": str(out), "model.name": tiny_model_dir, "task.dataset": str(prompts_file), **TINY_RUN, **over}
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in tree.items()])


# ---- the fast lane's budget: an unmarked test over 5 s fails ---------------------------------------------
# A test is "over" when both its wall time and its CPU time (this process and reaped children) exceed the
# limit. Wall time alone fails by chance on a loaded 2-core machine; CPU time alone is inflated by idle
# OpenMP threads spinning on an idle one. The smaller of the two is robust to both.
DURATION_LIMIT_S = float(os.environ.get("OAPL_TEST_DURATION_LIMIT_S", "5"))


def _cpu_seconds() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _measured(item, phase: str):
    import time

    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    result = yield
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    if min(wall, cpu) > DURATION_LIMIT_S and item.get_closest_marker("slow") is None:
        pytest.fail(
            f"unmarked test {phase} took {wall:.1f} s wall and {cpu:.1f} s CPU (limit "
            f"{DURATION_LIMIT_S:g} s): mark it @pytest.mark.slow or make it faster",
            pytrace=False,
        )
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _measured(item, "call"))
