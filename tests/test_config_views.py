"""oapl.config_views: each object derived from a config, made in one place (hand-checked values)."""

from __future__ import annotations

import pytest

from oapl.config import ConfigError, TrainConfig
from oapl.config_views import (
    eval_sampling_params,
    get_dotted,
    is_offline,
    sampling_params,
    set_dotted,
    tokenizer_source,
    with_updates,
)
from oapl.engines.base import SamplingParams


def _cfg(**tree) -> TrainConfig:
    return TrainConfig.model_validate({"model": {"name": "some/model"}, **tree})


def test_training_sampling_follows_the_config_and_its_overrides():
    cfg = _cfg(sampling={"temperature": 0.7, "max_tokens": 33, "stop": ["</a>"]})  # top_p must be 1 to train
    assert sampling_params(cfg, n=4) == SamplingParams(0.7, 1.0, 33, ("</a>",), n=4)
    assert sampling_params(cfg) == SamplingParams(0.7, 1.0, 33, ("</a>",), n=1)
    # temperature 0 is an override (greedy), max_tokens 0/None is "the configured length"
    assert sampling_params(cfg, 2, temperature=0.0, top_p=0.9, max_tokens=None) == SamplingParams(
        0.0, 0.9, 33, ("</a>",), n=2
    )
    assert sampling_params(cfg, 2, max_tokens=5).max_tokens == 5


def test_eval_sampling_defaults_its_length_to_training_and_keeps_the_stop_strings():
    cfg = _cfg(sampling={"max_tokens": 40, "stop": ["\n\n"]}, eval={"n": 3, "temperature": 0.5, "top_p": 0.8})
    assert eval_sampling_params(cfg) == SamplingParams(0.5, 0.8, 40, ("\n\n",), n=3)
    assert eval_sampling_params(cfg, n=7).n == 7
    assert eval_sampling_params(cfg, n=None).n == 3
    assert eval_sampling_params(with_updates(cfg, {"eval.max_tokens": 12})).max_tokens == 12


def test_tokenizer_source():
    assert tokenizer_source(_cfg()) == "some/model"
    with_tok = _cfg(model={"name": "some/model", "tokenizer": "other/tok"})
    assert tokenizer_source(with_tok) == "other/tok"
    # another model (a checkpoint) is saved with its own tokenizer
    assert tokenizer_source(with_tok, "/runs/a/checkpoint-3/model") == "/runs/a/checkpoint-3/model"


def test_offline_mode():
    assert not is_offline(_cfg())
    assert is_offline(_cfg(offline={"data": "data/rollouts"}))


def test_dotted_get_and_set():
    tree = {"a": {"b": [{"c": 1}, {"c": 2}]}, "x": 0}
    assert get_dotted(tree, "a.b.1.c") == 2
    assert get_dotted(tree, "a.b[0].c") == 1
    assert get_dotted(tree, "a.b.2.c") is None
    assert get_dotted(tree, "a.nope", default="missing") == "missing"
    assert get_dotted(tree, "x.y") is None  # a value is not a section
    set_dotted(tree, "a.new.deep", 5)
    assert tree["a"]["new"] == {"deep": 5}
    with pytest.raises(ConfigError, match=r"x\.y: 'x' is not a section"):
        set_dotted(tree, "x.y", 1)


def test_with_updates_validates_the_copy_and_leaves_the_original():
    cfg = _cfg()
    out = with_updates(cfg, {"output_dir": "runs/s1", "offline.data": "d", "offline.epochs": 2})
    assert (out.output_dir, out.offline.data, out.offline.epochs) == ("runs/s1", "d", 2)
    assert cfg.offline.data is None and cfg.output_dir != "runs/s1"
    with pytest.raises(ValueError):
        with_updates(cfg, {"offline.epochs": 0})
