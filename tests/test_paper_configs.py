"""The paper's two configs carry the paper's hyperparameters, and docs/paper-settings.md says so row by row."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from oapl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "configs" / "math_qwen3_4b.yaml"
CODE = ROOT / "configs" / "two_stage_deepcoder.yaml"

# read off the paper (arXiv 2602.19362, Sec. 5 and Appendix A) by hand, not from the docs
PAPER_MATH = {
    "model.name": "Qwen/Qwen3-4B-Thinking-2507",
    "task.dataset": "agentica-org/DeepScaleR-Preview-Dataset",
    "task.eval_benchmarks": ["aime25", "hmmt25_feb", "hmmt25_nov", "brumo25"],
    "algorithm.name": "oapl",
    "algorithm.beta1": 1.0,
    "algorithm.beta2": 1e-3,
    "rollout.sync_interval": 50,
    "rollout.group_size": 8,
    "rollout.prompts_per_step": 128,
    "algorithm.mini_batches": 2,  # 128 x 8 in 2 batches per update
    "optim.lr": 1e-6,
    "optim.betas": [0.9, 0.95],
    "sampling.temperature": 1.0,
    "sampling.top_p": 1.0,
    "sampling.max_tokens": 16384,
    "eval.temperature": 0.6,
    "eval.top_p": 0.95,
    "eval.max_tokens": 16384,
    "eval.n": 10,
}
PAPER_CODE = {
    "model.name": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
    "task.name": "code",
    "task.dataset": "agentica-org/DeepCoder-Preview-Dataset",
    "task.dataset_config": None,  # every training subset, not one
    "algorithm.name": "oapl",
    "algorithm.beta1": 1.0,
    "algorithm.beta2": 1e-3,
    "rollout.group_size": 8,
    "rollout.prompts_per_step": 32,  # 256 responses per step
    "algorithm.mini_batches": 1,
    "offline.min_correct": 1,
    "optim.lr": 1e-6,
    "optim.betas": [0.9, 0.999],
    "optim.max_grad_norm": 1.0,
    "optim.schedule": "cosine",
    "optim.warmup_ratio": 0.02,
    "sampling.temperature": 1.0,
    "sampling.top_p": 1.0,
    "sampling.max_tokens": 32000,
    "eval.temperature": 0.6,
    "eval.top_p": 0.95,
    "eval.n": 20,
    "eval.max_tokens": 65536,
}


def _get(tree: dict, dotted: str):
    node = tree
    for key in dotted.split("."):
        node = node[key]
    return node


@pytest.mark.parametrize("path, paper", [(MATH, PAPER_MATH), (CODE, PAPER_CODE)], ids=["math", "code"])
def test_config_has_the_papers_values(path, paper):
    cfg = load_config(path).model_dump(mode="json")
    wrong = {k: (_get(cfg, k), v) for k, v in paper.items() if _get(cfg, k) != v}
    assert not wrong, f"{path.name}: (config, paper) differ: {wrong}"


@pytest.mark.parametrize("path", [MATH, CODE], ids=["math", "code"])
def test_token_budgets_leave_room_for_prompts(path):
    cfg = load_config(path)
    longest = max(cfg.sampling.max_tokens, cfg.eval.max_tokens or 0)
    assert cfg.engine.max_model_len - longest >= 2048  # room for the prompt (checked per prompt at run time)
    assert cfg.task.thinking == "auto"


def _doc_cells() -> dict[str, list[tuple[str, str]]]:
    """``field: value`` cells of the config column, per section of docs/paper-settings.md."""
    text = (ROOT / "docs" / "paper-settings.md").read_text()
    out: dict[str, list[tuple[str, str]]] = {"math": [], "code": []}
    section = None
    for line in text.splitlines():
        if line.startswith("## "):
            section = "math" if line.startswith("## Math") else "code" if line.startswith("## Code") else None
        if section is None or not line.startswith("| ") or line.startswith("| setting"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4:
            continue
        for snippet in re.findall(r"`([^`]+)`", cells[2]):
            m = re.fullmatch(r"([a-z_]+(?:\.[a-z_0-9]+)*): (.+)", snippet)
            if m:
                out[section].append((m.group(1), m.group(2)))
    return out


def test_docs_table_matches_the_configs_row_by_row():
    cells = _doc_cells()
    assert len(cells["math"]) >= 20 and len(cells["code"]) >= 20
    for section, path in (("math", MATH), ("code", CODE)):
        cfg = load_config(path).model_dump(mode="json")
        for field, raw in cells[section]:
            assert _get(cfg, field) == yaml.safe_load(raw), f"docs/paper-settings.md ({section}): {field}"
    # and the docs show the paper's values where the config follows the paper
    documented = {f: yaml.safe_load(v) for f, v in cells["math"]}
    assert all(documented[k] == v for k, v in PAPER_MATH.items() if k in documented)
