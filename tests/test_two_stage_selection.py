"""The two-stage recipe picks its best checkpoint among the stage-2 epochs and says on which split."""

from __future__ import annotations

import logging

import pytest

import oapl.recipes.two_stage as ts
from oapl.config import load_config

# pass@1 per evaluated model: base and stage 1 score higher than any stage-2 epoch, so a recipe that
# still chose among them would pick one of them
SCORES = {"base-model": 0.9, "stage1-ckpt/model": 0.8, "s2-e1/model": 0.3, "s2-e2/model": 0.5, "s2-e3/model": 0.4}


@pytest.fixture
def fake_stages(monkeypatch):
    def fake_generate(cfg, out_dir, **kw):
        return {"out_dir": str(out_dir)}

    def fake_train(cfg, resume=False):
        stage = 1 if cfg.offline.epochs == 1 else 2
        return {"checkpoints": ["stage1-ckpt"] if stage == 1 else ["s2-e1", "s2-e2", "s2-e3"]}

    def fake_evaluate(cfg, model, out):
        return {"overall": {"pass_at_k": [{"k": 1, "mean": SCORES[model]}]}}

    monkeypatch.setattr(ts, "generate_dataset", fake_generate)
    monkeypatch.setattr(ts, "train_offline", fake_train)
    monkeypatch.setattr(ts, "_evaluate", fake_evaluate)
    monkeypatch.setattr(ts, "OVERALL", "overall")


def _cfg(tmp_path, *overrides):
    return load_config(None, ["model.name=base-model", f"output_dir={tmp_path}", *overrides])


def test_best_is_chosen_among_stage2_checkpoints_only(fake_stages, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="oapl.recipes.two_stage"):
        report = ts.run_two_stage(_cfg(tmp_path), stage2_epochs=3)
    # base (0.9) and stage 1 (0.8) are reported for reference but are not candidates
    assert report["eval"]["base"]["pass@1"] == 0.9 and report["eval"]["stage1"]["pass@1"] == 0.8
    assert report["selection"]["candidates"] == ["stage2-epoch1", "stage2-epoch2", "stage2-epoch3"]
    assert report["best"]["label"] == "stage2-epoch2" and report["best"]["pass@1"] == 0.5
    assert report["best"]["model"] == "s2-e2/model"
    # the arithmetic task's held-out set is its test set: said in the report and warned about
    assert report["best"]["selected_on"] == "the arithmetic task's built-in held-out set [test]"
    assert report["best"]["selected_on_test_split"] is True
    assert "chosen on the arithmetic task's built-in held-out set [test]" in caplog.text
    assert "optimistic (best of 3)" in caplog.text
    assert (tmp_path / "report.json").exists()


@pytest.mark.parametrize(
    "overrides, description, is_test",
    [
        (
            ["task.name=dataset", "task.dataset=d.jsonl", "task.eval_dataset=d.jsonl", "task.eval_split=validation"],
            "d.jsonl [validation]",
            False,
        ),
        (
            [
                "task.name=code",
                "task.dataset=hub/dc",
                "task.eval_dataset=hub/dc",
                "task.eval_dataset_config=lcbv5",
                "task.eval_split=test",
            ],
            "hub/dc (lcbv5) [test]",
            True,
        ),
        # the competition benchmarks are test sets whatever their Hub split is called
        (
            ["task.name=math", "task.dataset=d.jsonl", "task.eval_benchmarks=[aime25, brumo25]"],
            "aime25+brumo25 [benchmark problems]",
            True,
        ),
    ],
)
def test_selection_split(tmp_path, overrides, description, is_test):
    sel = ts.selection_split(_cfg(tmp_path, *overrides))
    assert (sel["description"], sel["test_split"]) == (description, is_test)


def test_no_warning_on_a_validation_split(fake_stages, tmp_path, caplog, monkeypatch):
    cfg = _cfg(
        tmp_path, "task.name=dataset", "task.dataset=d.jsonl", "task.eval_dataset=d.jsonl", "task.eval_split=val"
    )
    with caplog.at_level(logging.WARNING, logger="oapl.recipes.two_stage"):
        report = ts.run_two_stage(cfg, stage2_epochs=3, evaluate_base=False)
    assert "base" not in report["eval"]
    assert report["best"]["selected_on_test_split"] is False
    assert "optimistic" not in caplog.text


def test_cli_says_what_the_choice_was_made_on(fake_stages, tmp_path, monkeypatch, capsys):
    import oapl.preflight
    from oapl.cli.main import main

    monkeypatch.setattr(oapl.preflight, "check_config", lambda cfg, model=None: None)  # no Hub lookups here
    assert main(["two-stage", "model.name=base-model", f"output_dir={tmp_path / 'r'}", "--stage2-epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert (
        "best: stage2-epoch2 pass@1 0.5000, chosen among the stage-2 checkpoints on the arithmetic task's "
        "built-in held-out set [test] (the reported split: optimistic)"
    ) in out
