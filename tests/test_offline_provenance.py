"""Offline training refuses data sampled at another temperature / top-p / by other weights."""

from __future__ import annotations

import logging

import pytest

from oapl.config import load_config
from oapl.data.rollouts import RolloutGroup, write_rollouts
from oapl.backends.offline import check_sampling_provenance
from oapl.offline import train_offline


def _group(pid, temperature=1.0, top_p=1.0, weights_id="org/base", **sampling):
    return RolloutGroup(
        prompt_id=pid,
        prompt="p",
        prompt_token_ids=[1],
        responses=["a", "b"],
        response_token_ids=[[2], [3]],
        response_logprobs=[[-0.1], [-0.2]],
        rewards=[1.0, 0.0],
        finish_reasons=["stop", "stop"],
        weights_id=weights_id,
        version=0,
        sampling={"temperature": temperature, "top_p": top_p, "max_tokens": 8, **sampling},
    )


def _cfg(*overrides):
    return load_config(None, ["model.name=org/base", "offline.data=data/base", *overrides])


def test_matching_data_passes():
    check_sampling_provenance([_group("g0"), _group("g1")], _cfg())
    # integers and floats compare by value
    check_sampling_provenance([_group("g0", temperature=1)], _cfg())


def test_temperature_mismatch_names_both_values_and_a_prompt():
    groups = [_group("g0", temperature=0.7), _group("g1", temperature=0.7), _group("g2", temperature=0.7), _group("g3")]
    with pytest.raises(ValueError) as e:
        check_sampling_provenance(groups, _cfg())
    msg = str(e.value)
    assert msg.startswith("offline.data data/base: ")
    assert (
        "3 of 4 groups were sampled with temperature=0.7 (e.g. prompt_id 'g0') but sampling.temperature is 1.0" in msg
    )
    assert "offline.allow_sampling_mismatch=true" in msg


def test_top_p_and_weights_mismatch_are_both_reported():
    groups = [_group("g0", top_p=0.95, weights_id="org/other")]
    with pytest.raises(ValueError) as e:
        check_sampling_provenance(groups, _cfg())
    msg = str(e.value)
    assert "1 of 1 groups were sampled with top_p=0.95 (e.g. prompt_id 'g0') but sampling.top_p is 1.0" in msg
    assert "sampled by weights_id='org/other' (e.g. prompt_id 'g0') but model.name is 'org/base'" in msg


def test_unrecorded_temperature_is_a_mismatch():
    group = _group("g0")
    del group.sampling["temperature"]
    with pytest.raises(ValueError, match="temperature='not recorded'"):
        check_sampling_provenance([group], _cfg())


def test_same_local_weights_by_another_spelling(tmp_path, monkeypatch):
    (tmp_path / "ckpt" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    groups = [_group("g0", weights_id=str(tmp_path / "ckpt" / "model"))]
    check_sampling_provenance(groups, _cfg("model.name=ckpt/model/"))
    with pytest.raises(ValueError, match="model.name is 'ckpt'"):
        check_sampling_provenance(groups, _cfg("model.name=ckpt"))


def test_opt_out_warns_instead(caplog):
    groups = [_group("g0", temperature=0.6)]
    with caplog.at_level(logging.WARNING, logger="oapl.backends.offline"):
        check_sampling_provenance(groups, _cfg("offline.allow_sampling_mismatch=true"))
    assert "temperature=0.6" in caplog.text and "allowed by offline.allow_sampling_mismatch" in caplog.text


def test_train_offline_refuses_before_loading_anything(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_rollouts([_group(f"g{i}", temperature=0.7) for i in range(4)], data / "part-00000.parquet")
    cfg = load_config(
        None,
        [
            "model.name=org/not-downloaded",
            f"offline.data={data}",
            f"output_dir={tmp_path / 'run'}",
            "rollout.prompts_per_step=2",
            "sampling.temperature=1.0",
        ],
    )
    with pytest.raises(ValueError, match="temperature=0.7 .* but sampling.temperature is 1.0"):
        train_offline(cfg)
