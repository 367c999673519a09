"""Environment and input faults a user can fix end in one line ``oapl: ...`` (exit 2) naming the file,
field or row: a full disk, damaged model files, CUDA without a GPU, engine arguments the engine refuses,
LoRA targets that match nothing, unreadable YAML/JSON, ``prompt: None`` rows, and prompts too long for
the engine (checked over the whole split before the run starts, and by ``oapl check``)."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oapl.cli.main import main
from oapl.errors import DiskFullError, UserError

HERE = Path(__file__).parent
SRC = HERE.parent / "src"

# the one-line helpers and the process-state fixture of test_user_errors
from test_user_errors import _restore_process_state, assert_one_line, run_cli, train_args  # noqa: E402,F401


@pytest.fixture
def toy_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    """Prompt-length caches of this test in its own folder."""
    monkeypatch.setenv("OAPL_CACHE", str(tmp_path / "oapl-cache"))


def _copy_model(tiny_model_dir, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(tiny_model_dir, dst)
    return dst


# --------------------------------------------------------------------------- YAML and JSON files


def test_non_utf8_yaml_names_the_file_and_the_byte_offset(capsys, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(b"steps: 3\nseed: 1\n# caf\xe9\n")  # Latin-1 e-acute: byte 9 + 8 + 5 = 22, on line 3
    rc, err = run_cli(["train", str(cfg)], capsys)
    assert_one_line(rc, err, str(cfg), "not UTF-8", "byte offset 22", "line 3", "0xe9")
    rc, err = run_cli(["check", str(cfg)], capsys)
    assert rc == 2 and "Traceback" not in err


def test_invalid_yaml_names_line_and_column(capsys, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("steps: 3\nmodel: {name: x\n")
    rc, err = run_cli(["train", str(cfg)], capsys)
    line = assert_one_line(rc, err, str(cfg), "not valid YAML at line 3")
    assert "\n" not in line


def _passk_report(path):
    row = {"k": 1, "mean": 0.5, "std": 0.1, "stderr": 0.05}
    summary = {"pass_at_k": [row], "mean_reward": 0.5}
    path.write_text(json.dumps({"benchmarks": {"b": summary}, "overall": summary}, indent=1))
    return path


def test_corrupt_passk_report_names_file_and_line(capsys, tmp_path):
    good = _passk_report(tmp_path / "good.json")
    assert main(["plot", "passk", f"a={good}", "--out", str(tmp_path / "ok.png")]) == 0
    bad = tmp_path / "bad.json"
    text = good.read_text()
    bad.write_text(text[: len(text) // 2])  # truncated mid-file
    expected_line = text[: len(text) // 2].count("\n") + 1
    rc, err = run_cli(["plot", "passk", f"a={bad}", "--out", tmp_path / "x.png"], capsys)
    assert_one_line(rc, err, str(bad), f"not valid JSON at line {expected_line}")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"benchmarks": {"b": {"rows": []}}, "overall": {}}))
    rc, err = run_cli(["plot", "passk", f"a={other}", "--out", tmp_path / "x.png"], capsys)
    assert_one_line(rc, err, str(other), "pass_at_k")
    assert not (tmp_path / "x.png").exists()


def test_metrics_file_without_a_json_row(capsys, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b"\x00\xff garbage\nnot json\n")
    rc, err = run_cli(["plot", "training", f"a={metrics}", "--out", tmp_path / "x.png"], capsys)
    assert_one_line(rc, err, str(metrics), "no line is a JSON object", "1, 2")


# --------------------------------------------------------------------------- dataset rows


@pytest.mark.parametrize("value,state", [(None, "is None"), ("  ", "is empty")])
def test_prompt_none_says_what_is_wrong(capsys, tmp_path, tiny_model_dir, toy_path, value, state):
    data = tmp_path / "p.jsonl"
    rows = [{"id": f"r{i}", "question": f"q{i}"} for i in range(5)]
    rows[3]["question"] = value
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, err = run_cli(train_args(tiny_model_dir, data, tmp_path / "r"), capsys)
    line = assert_one_line(rc, err, str(data), "row 3", "column 'question' (mapped to 'prompt')", state)
    assert "missing column" not in line


def test_unmapped_prompt_none_and_a_missing_column(tmp_path):
    from oapl.data.datasets import DatasetError, map_columns

    with pytest.raises(DatasetError, match=r"^d: row 1: column 'prompt' is None \(null\); every row needs a prompt"):
        map_columns([{"prompt": "a"}, {"prompt": None, "answer": "1"}], {}, ["prompt"], "d")
    with pytest.raises(DatasetError, match=r"row 0: missing column 'prompt'; row has columns \['answer'\]"):
        map_columns([{"answer": "1"}], {}, ["prompt"], "d")
    # an empty answer is data (a reward may accept it); an answer of None is not
    assert map_columns([{"prompt": "a", "answer": ""}], {}, ["prompt", "answer"], "d")[0]["answer"] == ""


def test_non_utf8_and_invalid_json_datasets(tmp_path):
    from oapl.data.datasets import DatasetError, load_rows

    bad = tmp_path / "d.jsonl"
    bad.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DatasetError, match=r"not UTF-8 text: byte 0xff at byte offset 28 \(line 2\)"):
        load_rows(str(bad))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n')
    assert load_rows(str(bom))[0] == [{"prompt": "a"}]
    arr = tmp_path / "d.json"
    arr.write_text('[{"prompt": "a"},\n {"prompt": }]')
    with pytest.raises(DatasetError, match=r"d.json: not valid JSON at line 2, column 13"):
        load_rows(str(arr))


# --------------------------------------------------------------------------- model files and devices


def test_corrupt_config_json_is_named(capsys, tmp_path, prompts_file, toy_path, tiny_model_dir):
    model = _copy_model(tiny_model_dir, tmp_path)
    (model / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 32,\n  oops\n')
    rc, err = run_cli(train_args(str(model), prompts_file, tmp_path / "r"), capsys)
    assert_one_line(rc, err, "model.name", str(model / "config.json"), "not valid JSON at line 3")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors_is_named(capsys, tmp_path, prompts_file, toy_path, tiny_model_dir, keep):
    model = _copy_model(tiny_model_dir, tmp_path)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    rc, err = run_cli(train_args(str(model), prompts_file, tmp_path / "r"), capsys)
    assert_one_line(rc, err, "model.name", str(weights), "is damaged", f"{int(len(data) * keep):,} bytes")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())  # nothing written
    for hub in ([], ["--no-hub"]):  # oapl check finds it too, with or without the name lookups
        assert main(["check", *train_args(str(model), prompts_file, tmp_path / "r")[1:], *hub]) == 2
        out = capsys.readouterr().out
        assert f"model.name: {weights} is damaged" in out, out


def test_model_folder_without_weights_or_with_an_unknown_model_type(
    capsys, tmp_path, prompts_file, toy_path, tiny_model_dir
):
    model = _copy_model(tiny_model_dir, tmp_path)
    (model / "model.safetensors").unlink()
    rc, err = run_cli(train_args(str(model), prompts_file, tmp_path / "r"), capsys)
    assert_one_line(rc, err, "model.name", str(model), "config.json but no weights")
    other = _copy_model(tiny_model_dir, tmp_path, "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llamaa"}))
    rc, err = run_cli(train_args(str(other), prompts_file, tmp_path / "r2"), capsys)
    assert_one_line(rc, err, "model.name", str(other), "model_type 'llamaa'")


def test_loader_failure_on_a_damaged_folder_names_the_file(tmp_path, tiny_model_dir):
    """Without the CLI's preflight (oapl.train, Ray ranks), the loader's failure is traced to the file."""
    from oapl.trainer.model import load_causal_lm, load_tokenizer

    model = _copy_model(tiny_model_dir, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"model.name: .*model.safetensors is damaged \(1,000 bytes"):
        load_causal_lm(str(model), torch.float32, torch.device("cpu"))
    (model / "tokenizer_config.json").write_text("{")
    with pytest.raises(UserError, match=r"model.tokenizer: .*tokenizer_config.json is damaged"):
        load_tokenizer(str(model), field="model.tokenizer")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu(capsys, tmp_path, prompts_file, toy_path, tiny_model_dir, device):
    rc, err = run_cli(train_args(tiny_model_dir, prompts_file, tmp_path / "r", f"model.device={device}"), capsys)
    assert_one_line(rc, err, f"model.device={device}", "no GPU here", "model.device=auto or cpu")
    assert (
        main(
            [
                "check",
                *train_args(tiny_model_dir, prompts_file, tmp_path / "r")[1:],
                f"model.device={device}",
                "--no-hub",
            ]
        )
        == 2
    )
    assert f"model.device={device}: no GPU here" in capsys.readouterr().out


def test_pick_device_refuses_a_gpu_index_that_is_not_there(monkeypatch):
    from oapl.trainer import model as m

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert m.pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError, match=r"model.device=cuda:2: this machine has 2 GPU\(s\) \(cuda:0..cuda:1\)"):
        m.pick_device("cuda:2")
    with pytest.raises(UserError, match="model.device='gpu': not a device"):
        m.pick_device("gpu")


# --------------------------------------------------------------------------- engine and LoRA arguments


def test_engine_extra_with_the_transformers_engine(capsys, tmp_path, prompts_file, toy_path, tiny_model_dir):
    rc, err = run_cli(
        train_args(tiny_model_dir, prompts_file, tmp_path / "r", "engine.extra={max_num_seqs: 4}"), capsys
    )
    assert_one_line(rc, err, "engine.extra", "max_num_seqs", "transformers engine", "engine.kind=vllm")
    assert (
        main(
            [
                "check",
                *train_args(tiny_model_dir, prompts_file, tmp_path / "r")[1:],
                "engine.extra={max_num_seqs: 4}",
                "--no-hub",
            ]
        )
        == 2
    )
    assert "engine.extra=['max_num_seqs']: the transformers engine takes no extra arguments" in capsys.readouterr().out


@pytest.mark.slow  # imports vLLM (~8 s)
def test_engine_extra_key_vllm_does_not_take():
    pytest.importorskip("vllm")
    from oapl.engines.factory import check_engine_extra

    check_engine_extra("vllm", {"max_num_seqs": 4, "enable_prefix_caching": True, "cpu_threads": 1})
    with pytest.raises(
        UserError,
        match=r"engine.extra.max_num_seq: vllm.LLM \(vLLM .*\) has no argument "
        r"'max_num_seq'; did you mean 'max_num_seqs'\?",
    ):
        check_engine_extra("vllm", {"max_num_seq": 4})
    with pytest.raises(UserError, match="engine.extra.dtype: set by oapl from model.compute_dtype"):
        check_engine_extra("vllm", {"dtype": "float16"})


@pytest.mark.slow  # imports vLLM (~8 s)
def test_vllm_refusing_a_value_is_one_line(monkeypatch, tiny_model_dir):
    """vLLM validates its arguments when it starts (a wrong type, a max_model_len above the model's):
    a ValueError/TypeError there is the user's to fix, named as the engine's arguments."""
    pytest.importorskip("vllm")
    import vllm

    from oapl.engines.vllm_engine import VLLMEngine, vllm_import_error

    if vllm_import_error() is not None:
        pytest.skip(vllm_import_error())

    def refuse(model, **kwargs):
        raise ValueError(f"max_num_seqs: Input should be a valid integer (got {kwargs['max_num_seqs']!r})")

    monkeypatch.setattr(vllm, "LLM", refuse)
    with pytest.raises(
        UserError,
        match=r"^engine: vLLM refused its arguments on .*: ValueError: max_num_seqs: Input "
        r"should be a valid integer \(got 'four'\) \(vLLM arguments come from "
        r"engine.extra.*'max_num_seqs': 'four'",
    ):
        VLLMEngine(tiny_model_dir, max_num_seqs="four")

    def crash(model, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(vllm, "LLM", crash)  # anything else keeps its traceback
    with pytest.raises(RuntimeError, match="vLLM failed to start"):
        VLLMEngine(tiny_model_dir)


def test_lora_targets_that_match_nothing(capsys, tmp_path, prompts_file, toy_path, tiny_model_dir):
    rc, err = run_cli(
        train_args(
            tiny_model_dir,
            prompts_file,
            tmp_path / "r",
            "model.lora.enabled=true",
            "model.lora.target_modules=[qproj, vproj]",
        ),
        capsys,
    )
    line = assert_one_line(
        rc, err, "model.lora.target_modules=['qproj', 'vproj']", "q_proj", "v_proj", "down_proj", "all-linear"
    )
    assert "lm_head" not in line
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())  # nothing written
    # oapl check matches them on the meta device (no weights read), with peft's rule
    argv = ["check", *train_args(tiny_model_dir, prompts_file, tmp_path / "r")[1:], "model.lora.enabled=true"]
    assert main([*argv, "model.lora.target_modules=[qproj, vproj]", "--no-hub"]) == 2
    assert "model.lora.target_modules=['qproj', 'vproj']: " in capsys.readouterr().out
    assert main([*argv, "model.lora.target_modules=[q_proj, v_proj]", "--no-hub"]) == 0


# --------------------------------------------------------------------------- disk full


def test_disk_full_at_a_writer_names_the_path_and_space(tmp_path):
    """ENOSPC from a writer that does not name its file (a write(2) failing): the path is named."""
    from oapl.atomic import atomic_dir, atomic_write

    def writer(tmp):
        tmp.write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "out" / "summary.yaml"
    target.parent.mkdir()
    with pytest.raises(DiskFullError) as e:
        atomic_write(target, writer)
    msg = str(e.value)
    assert msg.startswith(f"disk full: cannot write {target} (") and "free on" in msg
    assert "100 B written before it failed" in msg
    assert list(target.parent.iterdir()) == []  # no temp file left behind
    import pickle

    assert str(pickle.loads(pickle.dumps(e.value))) == msg  # as a Ray trainer rank hands it over
    # a folder: the one beside it gives the space needed; safetensors' wording of the same fault
    (tmp_path / "ckpt" / "step-1").mkdir(parents=True)
    (tmp_path / "ckpt" / "step-1" / "w").write_bytes(b"x" * 2500)
    with pytest.raises(DiskFullError, match=r"disk full: cannot write .*step-2 .*it needs about 2.5 kB"):
        with atomic_dir(tmp_path / "ckpt" / "step-2") as tmp:
            (tmp / "w").write_bytes(b"x" * 10)
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-1"]
    # anything else keeps its own exception
    with pytest.raises(RuntimeError, match="unrelated"):
        with atomic_dir(tmp_path / "ckpt" / "step-3"):
            raise RuntimeError("unrelated")


def test_enospc_oserror_without_a_path_names_output_dir(capsys, monkeypatch, tmp_path):
    from oapl.cli import main as cli

    def full(args):
        args.output_dir = str(tmp_path / "run")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "cmd_train", full)  # what build_parser binds to `train`
    rc, err = run_cli(["train"], capsys)
    assert_one_line(rc, err, "disk full", str(tmp_path / "run"), "free on")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 kB tmpfs (a real ENOSPC), where this process may mount one (root); skipped otherwise."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("no mount here")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)  # lazy: a writer may hold a file


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_full_tmpfs_in_a_checkpoint_write(small_tmpfs, writer):
    """The writers of a checkpoint on a real full file system: torch's zip writer says only "iostream
    error" / "unexpected pos", safetensors "os error 28"; both are one DiskFullError naming the folder,
    and the folder beside it is untouched."""
    from safetensors.torch import save_file

    from oapl.atomic import atomic_dir

    ckpts = small_tmpfs / "checkpoints"
    (ckpts / "step-1").mkdir(parents=True)
    (ckpts / "step-1" / "w").write_bytes(b"x" * 20_000)
    big = {"w": torch.zeros(40_000)}  # 160 kB
    with pytest.raises(DiskFullError) as e:
        with atomic_dir(ckpts / "step-2") as tmp:
            torch.save(big, tmp / "state.pt") if writer == "torch.save" else save_file(big, str(tmp / "w.safetensors"))
    msg = str(e.value)
    assert msg.startswith(f"disk full: cannot write {ckpts / 'step-2'} (") and "it needs about 20.0 kB" in msg, msg
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-1"]  # no partial folder; the old one intact
    assert (ckpts / "step-1" / "w").stat().st_size == 20_000


@pytest.mark.slow  # a real training run in a subprocess (~15 s)
def test_file_size_limit_during_a_checkpoint(tmp_path, tiny_model_dir, prompts_file):
    """A real write failure: RLIMIT_FSIZE below a checkpoint's size. One line, exit 2, the metrics kept,
    no half-written checkpoint."""
    out = tmp_path / "r"
    args = [a for a in train_args(tiny_model_dir, prompts_file, out) if a != "checkpoint.save_final=false"]
    limit = 40_000  # the tiny model's weights are ~89 kB

    def limit_writes():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{HERE}", "OAPL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "oapl.cli.main", *args, "checkpoint.save_final=true"],
        preexec_fn=limit_writes,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("oapl: ")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"oapl: file too large: cannot write {out / 'checkpoints' / 'step-00000002'}")
    assert "the file-size limit (ulimit -f) is 40.0 kB" in lines[0] and "it needs about" in lines[0]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # what was computed is kept
    assert list((out / "checkpoints").iterdir()) == []  # no partial checkpoint


# --------------------------------------------------------------------------- prompts too long for the engine


def _long_at_row_20(tmp_path, n=30):
    data = tmp_path / "long.jsonl"
    rows = [{"id": f"p{i}", "question": "x" * 80 if i == 20 else f"say {i}"} for i in range(n)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


# the chat-templated prompt of the char tokenizer: <|im_start|> user \n TEXT <|im_end|> \n <|im_start|>
# assistant \n = 1 + 4 + 1 + len(TEXT) + 1 + 1 + 1 + 9 + 1 tokens
ROW_20_TOKENS = 19 + 80


def test_long_prompt_at_row_20_refused_before_training(capsys, tmp_path, tiny_model_dir, toy_path):
    data = _long_at_row_20(tmp_path)
    out = tmp_path / "r"
    rc, err = run_cli(train_args(tiny_model_dir, data, out, "engine.max_model_len=64"), capsys)
    assert_one_line(
        rc,
        err,
        "train row 20 (prompt_id 'p20')",
        f"prompt of {ROW_20_TOKENS} tokens",
        "engine.max_model_len=64",
        "sampling.max_tokens=4",
    )
    assert not (out / "metrics.jsonl").exists()  # refused before the run started


def test_long_prompt_at_row_20_in_oapl_check(capsys, tmp_path, tiny_model_dir, toy_path):
    data = _long_at_row_20(tmp_path)
    argv = ["check", *train_args(tiny_model_dir, data, tmp_path / "r")[1:], "engine.max_model_len=64", "--no-hub"]
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln]
    assert any(ln.startswith(f"train row 20 (prompt_id 'p20'): prompt of {ROW_20_TOKENS} tokens") for ln in lines), (
        lines
    )
    assert not any("is ready to run" in ln for ln in lines)
    # the default of 8 answer-checked rows does not limit the token check
    assert main([*argv[:-1], "engine.max_model_len=200", "--rows", "2", "--no-hub"]) == 0
    assert "tokenized every prompt (30 train" in capsys.readouterr().out


def test_eval_split_is_checked_when_the_run_evaluates(tmp_path, char_tokenizer):
    from oapl.config import load_config
    from oapl.data.budget import TokenBudgetError, check_splits
    from oapl.data.tasks import Task

    task = Task(
        "t",
        train=[{"prompt": "a", "prompt_id": "t0"}],
        eval=[{"prompt": "b", "prompt_id": "e0"}, {"prompt": "y" * 50, "prompt_id": "e1"}],
        reward_fn=lambda p, c, **k: [0.0] * len(c),
    )
    cfg = load_config(None, ["sampling.max_tokens=10"])
    assert check_splits(cfg, task, char_tokenizer, 80, evaluate=False) == 19 + 1
    with pytest.raises(
        TokenBudgetError,
        match=r"^eval row 1 \(prompt_id 'e1'\): prompt of 69 tokens \+ "
        r"sampling.max_tokens=10 = 79 tokens",
    ):
        check_splits(cfg, task, char_tokenizer, 78)


def test_prompt_lengths_are_batched_and_cached(tmp_path, char_tokenizer, monkeypatch):
    from oapl.data import budget
    from oapl.data.tasks import Task

    rows = [{"prompt": "z" * (i % 7), "prompt_id": str(i)} for i in range(2500)]
    task = Task("t", train=rows, eval=[], reward_fn=lambda p, c, **k: [0.0] * len(c))
    calls = []
    real = budget._batch_counter

    def counting(tokenizer):
        count = real(tokenizer)
        return lambda texts: calls.append(len(texts)) or count(texts)

    monkeypatch.setattr(budget, "_batch_counter", counting)
    first = budget.prompt_lengths(task, rows, char_tokenizer)
    assert first == [19 + i % 7 for i in range(2500)]  # as the worker counts: tokenizer(text) per prompt
    assert first[:50] == [
        len(char_tokenizer(task.render(r, char_tokenizer), add_special_tokens=False).input_ids) for r in rows[:50]
    ]
    assert calls == [1024, 1024, 452]  # three batch calls
    cached = list((tmp_path / "oapl-cache" / "prompt_lengths").iterdir())
    assert len(cached) == 1
    calls.clear()
    assert budget.prompt_lengths(task, rows, char_tokenizer) == first
    assert calls == []  # read back, not tokenized again
    # another template, another row: counted again
    task.system_prompt = "sys"
    assert budget.prompt_lengths(task, rows, char_tokenizer)[0] == 19 + 1 + 6 + 1 + 3 + 1 + 1
    assert calls == [1024, 1024, 452]
    calls.clear()
    budget.prompt_lengths(task, [*rows[:-1], {"prompt": "changed", "prompt_id": "x"}], char_tokenizer)
    assert calls == [1024, 1024, 452]
    assert len(list((tmp_path / "oapl-cache" / "prompt_lengths").iterdir())) == 3
    # a cache that cannot be written (here: a file where its folder should be) costs a recount, not the run
    monkeypatch.setenv("OAPL_CACHE", str(tmp_path / "blocked"))
    (tmp_path / "blocked").write_text("")
    calls.clear()
    assert budget.prompt_lengths(task, rows, char_tokenizer)[1] == 19 + 1 + 6 + 1 + 3 + 1 + 1 + 1
    assert calls == [1024, 1024, 452]


def test_batch_counter_falls_back_when_the_backend_disagrees(char_tokenizer):
    """A tokenizer that changes the text before its Rust backend sees it is counted its own way."""
    from oapl.data.budget import _batch_counter

    texts = ["ab", "abcd", "a"]
    assert _batch_counter(char_tokenizer)(texts) == [2, 4, 1]

    class Doubling:  # what the worker would count: every character twice
        backend_tokenizer = char_tokenizer.backend_tokenizer

        def __call__(self, texts, add_special_tokens=False):
            return char_tokenizer([t * 2 for t in texts], add_special_tokens=add_special_tokens)

    count = _batch_counter(Doubling())
    assert count(texts) == [4, 8, 2]
    assert count(["xyz"]) == [6]


def test_oapl_generate_checks_every_prompt_before_the_first_is_generated(tmp_path, tiny_model_dir, toy_path):
    """`oapl generate` names row 20 of the split (not its row within a batch of prompts) and generates nothing."""
    from oapl.data.budget import TokenBudgetError
    from oapl.generate import generate_dataset
    from test_token_budget import LimitedEngine

    from conftest import tiny_config

    cfg = tiny_config(tiny_model_dir, _long_at_row_20(tmp_path), tmp_path / "r")
    engine = LimitedEngine(64)
    with pytest.raises(
        TokenBudgetError,
        match=rf"^train row 20 \(prompt_id 'p20'\): prompt of {ROW_20_TOKENS} "
        r"tokens \+ sampling.max_tokens=6",
    ):
        generate_dataset(cfg, tmp_path / "data", n=2, batch_prompts=8, engine=engine)
    assert engine.calls == 0
