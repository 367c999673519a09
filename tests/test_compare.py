"""``oapl compare``: planning, summaries, the report, resumption and the CLI (tiny random model)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from oapl.compare import CompareConfig, build_report, plan_runs, run_compare, summarize_run
from oapl.config import ConfigError, load_config

from conftest import write_prompts


@pytest.fixture
def prompts_file(tmp_path):
    return write_prompts(tmp_path / "prompts.jsonl", 24)


def study(tiny_model_dir, prompts_file, out, **over) -> CompareConfig:
    tree = {
        "output_dir": str(out / "runs"),
        "report": str(out / "docs" / "report.md"),
        "figures_dir": str(out / "docs" / "img"),
        "figure_prefix": "t",
        "smooth": 2,
        "base": {
            "steps": 4,
            "threads": 2,
            "model": {"name": tiny_model_dir, "logprob_chunk_size": 16},
            "sampling": {"max_tokens": 5, "temperature": 1.0},
            "engine": {"kind": "transformers"},
            "task": {
                "name": "dataset",
                "dataset": str(prompts_file),
                "eval_dataset": str(prompts_file),
                "max_eval_prompts": 3,
                "columns": {"prompt": "question", "prompt_id": "id"},
                "reward": "toy_rewards:has_seven",
                "system_prompt": None,
            },
            "rollout": {
                "group_size": 2,
                "prompts_per_step": 2,
                "prompts_per_generate": 2,
                "sync_interval": 2,
                "asynchronous": False,
                "buffer_groups": 4,
            },
            "optim": {"lr": 1e-3, "micro_batch_size": 8},
            "eval": {"every": 2, "n": 2, "temperature": 1.0},
            "logging": {"progress": False},
            "checkpoint": {"save_final": False},
        },
        "seeds": [0],
        "checkpoint_every": 2,
        "lag_sweep": {"intervals": [1, 2], "steps": 4},
        "final_eval": {"n": 4},
    }
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in {**tree, **over}.items()], cls=CompareConfig)


def test_plan_shares_runs_and_scales_sweep_steps(tiny_model_dir, prompts_file, tmp_path):
    cc = study(tiny_model_dir, prompts_file, tmp_path)
    runs = plan_runs(cc)
    assert [(r.group, r.name) for r in runs] == [
        ("algorithms", "oapl"),
        ("algorithms", "grpo_is"),
        ("lag_sweep", "oapl_L1"),
        ("lag_sweep", "oapl_L2"),
    ]
    oapl, grpo, l1, l2 = runs
    assert l2.same_as == "oapl" and l2.run_dir == oapl.run_dir  # identical configuration: trained once
    assert l1.same_as is None and l1.cfg.rollout.sync_interval == 1
    g = grpo.cfg
    assert (g.algorithm.name, g.algorithm.is_cap, g.algorithm.clip_eps) == ("grpo", 2.0, 0.2)
    assert g.algorithm.mini_batches == 2  # the paper's GRPO+IS: the PPO clip acts from the second mini-batch
    assert (g.rollout.sync_interval, g.rollout.max_staleness, g.rollout.asynchronous) == (1, 1, True)
    assert grpo.label == "GRPO (IS cap 2, L=1, near on-policy, off-by-one async, 2 mini-batches)"
    assert oapl.label == "OAPL (L=2)"
    # resumable: checkpoints at sync boundaries, and a final one for the final evaluation
    assert [r.cfg.checkpoint.every for r in runs] == [2, 2, 2, 2] and all(r.cfg.checkpoint.save_final for r in runs)
    cc3 = study(
        tiny_model_dir, prompts_file, tmp_path, checkpoint_every=3, lag_sweep={"intervals": [2, 5], "steps": 10}
    )
    assert [r.cfg.checkpoint.every for r in plan_runs(cc3, only="lag")] == [4, 5]  # rounded up to multiples of L
    # the same sample budget for every run
    budgets = {r.cfg.steps * r.cfg.rollout.prompts_per_step * r.cfg.rollout.group_size for r in runs}
    assert budgets == {16}
    # without explicit sweep steps: the largest L sees min_syncs windows
    cc2 = study(tiny_model_dir, prompts_file, tmp_path, lag_sweep={"intervals": [1, 10, 50, 100]})
    sweep = [r for r in plan_runs(cc2, only="lag")]
    assert {r.cfg.steps for r in sweep} == {200} and [r.lag for r in sweep] == [1, 10, 50, 100]
    assert all(r.group == "lag_sweep" for r in sweep)
    # several seeds: every configuration once per seed; the beta2 sweep on seeds of its own
    cc4 = study(
        tiny_model_dir,
        prompts_file,
        tmp_path,
        seeds=[0, 1],
        beta2_sweep={"enabled": True, "values": [0.1, 0.01], "seeds": [7]},
    )
    runs = plan_runs(cc4)
    assert sorted({(r.name, r.seed) for r in runs if r.group == "algorithms"}) == [
        ("grpo_is", 0),
        ("grpo_is", 1),
        ("oapl", 0),
        ("oapl", 1),
    ]
    b2 = [r for r in runs if r.group == "beta2_sweep"]
    assert [(r.name, r.seed, r.cfg.algorithm.beta2) for r in b2] == [("oapl_b2_0.01", 7, 0.01), ("oapl_b2_0.1", 7, 0.1)]
    # a lag sweep on a subset of the seeds; its L=2 point is the algorithms' OAPL run of that seed
    cc5 = study(
        tiny_model_dir,
        prompts_file,
        tmp_path,
        seeds=[0, 1, 2],
        lag_sweep={"intervals": [1, 2], "steps": 4, "seeds": [1]},
    )
    sweep = [(r.name, r.seed, r.same_as) for r in plan_runs(cc5) if r.group == "lag_sweep"]
    assert sweep == [("oapl_L1", 1, None), ("oapl_L2", 1, "oapl")]
    assert len([r for r in plan_runs(cc5) if r.group == "algorithms"]) == 6


def test_plan_names_the_bad_run(tiny_model_dir, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match="intervals"):
        study(tiny_model_dir, prompts_file, tmp_path, lag_sweep={"intervals": [0, 5]})
    cc = study(tiny_model_dir, prompts_file, tmp_path, algorithms={"stale_oapl": {"rollout": {"max_staleness": 1}}})
    with pytest.raises(ConfigError, match="algorithms.stale_oapl"):
        plan_runs(cc)
    with pytest.raises(ConfigError, match="unknown field"):
        study(tiny_model_dir, prompts_file, tmp_path, lag_sweeps={})
    with pytest.raises(ConfigError, match=r"lag_sweep.seeds .*not in seeds: \[5\]"):
        study(tiny_model_dir, prompts_file, tmp_path, seeds=[0, 1], lag_sweep={"seeds": [5]})


def test_summarize_run_hand_made(tmp_path):
    rows = [{"step": 0, "samples_seen": 0, "eval/pass@1": 0.2, "eval/pass@2": 0.3}]
    for s in range(1, 11):
        rows.append(
            {
                "step": s,
                "samples_seen": 4 * s,
                "loss": 0.1,
                "reward_mean": s / 10,
                "seq_entropy": 11 - s,
                "kl": 0.01 * s,
                "lag": (s - 1) % 5,
                **({"synced_to_version": s // 5} if s % 5 == 0 else {}),
            }
        )
    rows.append({"step": 10, "samples_seen": 40, "eval/pass@1": 0.5, "eval/pass@2": 0.7})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize_run(tmp_path)
    assert s["steps"] == 10 and s["samples_seen"] == 40 and s["k_max"] == 2
    assert (s["pass1_before"], s["pass1_after"], s["passk_before"], s["passk_after"]) == (0.2, 0.5, 0.3, 0.7)
    assert s["reward_mean_first"] == pytest.approx(0.1) and s["reward_mean_last"] == pytest.approx(1.0)
    assert s["seq_entropy_first"] == 10 and s["seq_entropy_last"] == 1
    assert s["kl_mean"] == pytest.approx(0.055) and s["kl_max"] == pytest.approx(0.1)
    assert s["lag_max"] == 4 and s["syncs"] == 2


@pytest.mark.slow  # a study end to end: 38-47 s on a loaded 2-core machine
def test_compare_end_to_end_report_and_resume(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    cc = study(
        tiny_model_dir,
        prompts_file,
        tmp_path,
        seeds=[0, 1],
        beta2_sweep={"enabled": True, "values": [0.1], "seeds": [7]},
    )
    cc.base["checkpoint"] = {"save_final": False, "keep": 3}
    report = run_compare(cc, command="oapl compare study.yaml")
    text = report.read_text()
    img = tmp_path / "docs" / "img"
    for png in ("t_algorithms.png", "t_lag_sweep.png", "t_passk.png", "t_lag_passk.png"):
        assert (img / png).stat().st_size > 10_000, png
        assert f"](img/{png})" in text  # relative links
    for needle in (
        "oapl compare study.yaml",
        "OAPL (L=2)",
        "GRPO (IS cap 2, L=1, near on-policy, off-by-one async",
        "OAPL L=1",
        "OAPL L=2",
        "pass@4",
        "Reused from the comparison",
        "The paper's claims, tested",
        "base model (before training)",
        "Paired differences, OAPL minus each GRPO+IS arm",
        "Every arm against the base model",
        "Did GRPO+IS's correction act?",
        "beta2 sweep",
        "Contradicted by this miniature",
        "2 seeds x 3 prompts",
    ):
        assert needle in text, needle
    assert "Not run yet" not in text
    claims = json.loads((tmp_path / "runs" / "claims.json").read_text())
    assert [c["verdict"] for c in claims] and all(
        c["verdict"] in ("reproduced", "not reproduced", "inconclusive") for c in claims
    )
    # pass@1, pass@k at large k, every arm vs the base model, token and sequence entropy, stability
    assert [c["text"].split(" (")[0] for c in claims] == [
        "OAPL outperforms GRPO+IS in held-out pass@1 at equal training samples",
        "OAPL's pass@k is better than GRPO+IS's at large k",
        "RL improves pass@k over the base model at every k up to 4",
        "OAPL keeps the policy's token entropy",
        "OAPL keeps the policy's sequence entropy",
        "OAPL trains stably with a large policy lag",
    ]
    grpo_rows = [
        json.loads(x) for x in (tmp_path / "runs" / "grpo_is" / "seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(0 < r["is_weight_p1"] <= r["is_weight_p99"] <= 2.0 for r in grpo_rows if "loss" in r)
    runs_dir = tmp_path / "runs"
    assert not (runs_dir / "oapl_L2").exists()  # the L=2 point is the OAPL comparison run
    for name in ("oapl", "grpo_is", "oapl_L1"):
        for seed in (0, 1):
            rows = [json.loads(x) for x in (runs_dir / name / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            train_rows = [r for r in rows if "loss" in r]
            assert len(train_rows) == 4 and train_rows[-1]["samples_seen"] == 16
            assert [r["step"] for r in rows if "eval/pass@1" in r] == [0, 2, 4], (name, seed)
            res = json.loads((runs_dir / name / f"seed{seed}" / "final_eval" / "result.json").read_text())
            assert res["n"] == 4 and res["prompt_ids"] == ["p0", "p1", "p2"] and len(res["token_entropy"]) == 3
            assert all(0 <= c <= 4 for c in res["correct"])
    base = json.loads((runs_dir / "_base_eval" / "result.json").read_text())
    assert base["settings"]["checkpoint"] is None and base["n"] == 4
    # the step-0 evaluation ran once per seed and was shared
    first = json.loads((runs_dir / "oapl" / "seed0" / "metrics.jsonl").read_text().splitlines()[0])
    other = json.loads((runs_dir / "grpo_is" / "seed0" / "metrics.jsonl").read_text().splitlines()[0])
    assert other["eval/pass@1"] == first["eval/pass@1"] and "shared_from" in other
    grpo_rows = [json.loads(x) for x in (runs_dir / "grpo_is" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["lag"] <= 1 for r in grpo_rows if "loss" in r)
    assert all("clip_frac" in r for r in grpo_rows if "loss" in r)

    # a second invocation reuses every complete run and every final evaluation
    import oapl.loop
    import oapl.trainer.policy

    def boom(*a, **k):
        raise AssertionError("a complete run was retrained or re-evaluated")

    monkeypatch.setattr(oapl.loop, "train", boom)
    monkeypatch.setattr(oapl.trainer.policy, "load_policy", boom)
    assert "oapl compare --second-call" in run_compare(cc, command="oapl compare --second-call").read_text()
    monkeypatch.undo()

    # an interrupted run resumes from its latest checkpoint (here: step 2 of 4) instead of starting over
    from oapl.trainer.checkpoint import latest_checkpoint, list_checkpoints

    victim = runs_dir / "oapl_L1" / "seed1"
    import shutil

    shutil.rmtree(latest_checkpoint(victim))
    assert latest_checkpoint(victim).name.endswith("2")
    (victim / "summary.yaml").unlink()
    shutil.rmtree(victim / "final_eval")
    lines = (victim / "metrics.jsonl").read_text().splitlines()
    calls = []
    real = oapl.loop.train

    def spy(cfg, **kw):
        calls.append((cfg.output_dir, kw))
        return real(cfg, **kw)

    monkeypatch.setattr(oapl.loop, "train", spy)
    run_compare(cc)
    assert calls == [(str(victim), {"resume": True, "overwrite": False})]
    rows = [json.loads(x) for x in (victim / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # steps 3-4 trained once more, not duplicated
    assert (victim / "final_eval" / "result.json").exists() and len(list_checkpoints(victim)) >= 1
    assert len(lines) >= 4

    # a changed configuration is not "complete"
    monkeypatch.setattr(oapl.loop, "train", boom)
    cc2 = study(
        tiny_model_dir,
        prompts_file,
        tmp_path,
        lag_sweep={"intervals": [1], "steps": 4},
        algorithms={"oapl": {"optim": {"lr": 2e-3}}},
    )
    with pytest.raises(AssertionError, match="retrained"):
        run_compare(cc2)


def test_quick_applies_its_section(tiny_model_dir, prompts_file, tmp_path):
    from oapl.compare import load_compare_config
    import yaml

    cc = study(
        tiny_model_dir,
        prompts_file,
        tmp_path,
        quick={"seeds": [0], "base": {"steps": 2}, "output_dir": str(tmp_path / "quick")},
    )
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(json.loads(cc.model_dump_json())))
    q = load_compare_config(str(path), quick=True)
    assert q.seeds == [0] and q.base["steps"] == 2 and q.output_dir == str(tmp_path / "quick")
    assert q.base["model"]["name"] == tiny_model_dir  # the rest of base is kept
    plain = study(tiny_model_dir, prompts_file, tmp_path)
    path.write_text(yaml.safe_dump(json.loads(plain.model_dump_json())))
    with pytest.raises(ConfigError, match="no `quick` section"):
        load_compare_config(str(path), quick=True)


def test_report_lists_missing_runs(tiny_model_dir, prompts_file, tmp_path):
    cc = study(tiny_model_dir, prompts_file, tmp_path)
    report = build_report(cc, plan_runs(cc), command="x")
    text = report.read_text()
    assert "## Not run yet" in text and "OAPL L=1" in text


def test_cli_dry_run(tiny_model_dir, prompts_file, tmp_path, capsys):
    from oapl.cli import compare as cli_compare

    cfg = tmp_path / "study.yaml"
    import yaml

    cc = study(tiny_model_dir, prompts_file, tmp_path)
    cfg.write_text(yaml.safe_dump(json.loads(cc.model_dump_json())))
    parser = argparse.ArgumentParser(prog="oapl")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_compare.register(sub)
    args = parser.parse_args(["compare", str(cfg), "lag_sweep.intervals=[1,3]", "--dry-run"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "OAPL L=3" in out and "samples=16" in out and "GRPO (IS cap 2" in out
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_shipped_cpu_config_plans():
    from oapl.compare import load_compare_config

    path = Path(__file__).parents[1] / "configs" / "compare_cpu.yaml"
    cc = load_compare_config(str(path))
    runs = plan_runs(cc)
    study = [r for r in runs if r.group != "beta2_sweep"]
    assert sorted({r.lag for r in study if r.group == "lag_sweep"}) == [50, 100]
    budgets = {r.cfg.steps * r.cfg.rollout.prompts_per_step * r.cfg.rollout.group_size for r in study}
    assert len(budgets) == 1  # one sample budget for every run of the comparison and the sweep
    # 3 algorithms per seed; the lag sweep's L=100 on its seeds (its L=50 is the OAPL run)
    assert (
        sum(r.same_as is None for r in study) == 3 * len(cc.seeds) + 1 * len(cc.lag_sweep.seeds) and len(cc.seeds) >= 3
    )
    # GRPO+IS near on-policy, and at the lag (in responses and optimiser steps) of OAPL's L=50
    grpo = {r.name: r.cfg.rollout for r in study if r.group == "algorithms" and r.cfg.algorithm.name == "grpo"}
    assert (grpo["grpo_is"].sync_interval, grpo["grpo_is"].max_staleness) == (1, 1)
    oapl = next(r.cfg for r in study if r.name == "oapl")
    for name, oapl_lag in (("grpo_is_L25", 50),):
        g = next(r.cfg for r in study if r.name == name)
        assert g.rollout.max_staleness >= 4 and g.rollout.asynchronous
        per_step = lambda c: (c.rollout.prompts_per_step * c.rollout.group_size, c.algorithm.mini_batches)  # noqa: E731
        assert [g.rollout.sync_interval * x for x in per_step(g)] == [oapl_lag * x for x in per_step(oapl)]
    # verdict thresholds declared in the config; beta2 stated as fixed, not chosen by the sweep
    assert cc.claims.non_inferiority_margin == 0.05 and 0 < cc.claims.keeps_entropy < 1
    assert "fixed" in cc.beta2_sweep.note and "chooses nothing" in cc.beta2_sweep.note
    assert [r.same_as for r in study if r.lag == 50 and r.group == "lag_sweep"] == ["oapl"] * len(cc.lag_sweep.seeds)
    assert all(r.cfg.steps // r.lag >= 2 for r in study if r.lag <= 50)  # >= 2 weight windows for every L <= 50
    assert {r.cfg.steps * r.cfg.algorithm.mini_batches for r in runs if r.group == "algorithms"} == {
        100
    }  # optimiser steps
    assert cc.final_eval.n >= 16 and runs[0].cfg.task.num_eval >= 128
    # the beta2 sweep is off in the shipped study (beta2 is fixed); switched on, it runs on seeds of its own
    assert not [r for r in runs if r.group == "beta2_sweep"]
    b2 = [
        r
        for r in plan_runs(cc.model_copy(update={"beta2_sweep": cc.beta2_sweep.model_copy(update={"enabled": True})}))
        if r.group == "beta2_sweep"
    ]
    assert b2 and not {r.seed for r in b2} & set(cc.seeds)  # beta2 is not chosen on the study's seeds
    assert cc.base["algorithm"]["beta2"] in [r.beta2 for r in b2]
    quick = load_compare_config(str(path), quick=True)
    assert len([r for r in plan_runs(quick) if r.same_as is None]) <= 8 and quick.output_dir != cc.output_dir


@pytest.mark.slow  # two studies side by side: 10 s
def test_invocations_side_by_side_skip_each_others_runs(tiny_model_dir, prompts_file, tmp_path, monkeypatch, caplog):
    """A run locked by another invocation is skipped (not trained twice); a piece (--only) writes its own
    report, so the study's report is only ever written whole."""
    import oapl.loop
    from oapl.compare import runner

    cc = study(tiny_model_dir, prompts_file, tmp_path, lag_sweep={"enabled": False}, final_eval={"enabled": False})
    trained = []
    real = oapl.loop.train
    monkeypatch.setattr(oapl.loop, "train", lambda cfg, **kw: (trained.append(cfg.output_dir), real(cfg, **kw))[1])
    grpo = next(r for r in plan_runs(cc) if r.name == "grpo_is")
    lock = Path(cc.output_dir) / ".locks" / (runner._lock_name(grpo) + ".lock")
    with runner._lock(lock, wait=True) as held, caplog.at_level("INFO", logger="oapl.compare.runner"):
        assert held  # another invocation is training grpo_is/seed0
        report = run_compare(cc, only="algorithms")
    assert trained == [str(Path(cc.output_dir) / "oapl" / "seed0")]
    assert "grpo_is/seed0: in progress in another invocation, skipped" in caplog.text
    assert report == Path(cc.output_dir) / "report_algorithms.md" and not cc.report_path().exists()
    # the lock released (that invocation ended): the next invocation trains it, and reuses the other
    trained.clear()
    assert run_compare(cc) == cc.report_path() and cc.report_path().exists()
    assert trained == [str(Path(cc.output_dir) / "grpo_is" / "seed0")]
