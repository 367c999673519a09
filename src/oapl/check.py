"""``oapl check CONFIG``: catch a bad launch before it starts, and print the plan of the run.

A first real run is the paper's setting on rented GPUs for a day or more; everything that can be
known before it starts is checked here, in this order, collecting one line per problem:

1. the configuration validates (every refusal of :class:`oapl.config.TrainConfig`: token budgets
   against ``engine.max_model_len``, top-p where the loss needs the full distribution, ...);
2. the model and dataset names resolve (:func:`oapl.preflight.check_config`: local paths exist, Hub
   names are known, with a short timeout);
3. the task builds (every row of every dataset has its columns; code tests parse), and the first
   ``rows`` rows of each split have what their reward needs (a math answer math-verify can parse, a
   code problem with tests);
4. every prompt of each split, rendered with the chat template and tokenized (in batches, cached: what
   ``oapl train`` checks before it starts), fits ``engine.max_model_len`` with ``sampling.max_tokens``
   (training) and ``eval.max_tokens`` (evaluation);
5. offline data (``offline.data``) was sampled at the configured temperature / top-p by
   ``model.name``.

Then the plan: steps, batch and mini-batches, syncs, optimiser steps and samples per sync window,
tokens per step, and the memory plan per rank (:mod:`oapl.memory_plan`: trainer weights, gradients,
AdamW state, FSDP2's gathered units, activations, logits; host memory; checkpoint size; the engine's
weights and KV cache) for the GPUs of ``--gpus N --gpu-memory SIZE`` (default: the devices present;
none on a CPU-only machine, where a GPU config's plan is printed but not fitted), and the
environment (:func:`oapl.preflight.check_environment`). A plan that does not fit is a problem line
naming memory and the change that would make it fit. :func:`run_check` returns it all; the command
prints the plan and exits 0, or prints one line per problem and exits 2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oapl.config import ConfigError, TrainConfig, load_config
from oapl.config_views import is_offline, load_config_tokenizer

log = logging.getLogger(__name__)

GB = 1e9


@dataclass
class CheckResult:
    problems: list[str] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _message(exc: BaseException) -> str:
    from oapl.errors import user_message

    return user_message(exc) or f"{type(exc).__name__}: {exc}"


def _config_problems(err: ConfigError) -> list[str]:
    """One line per field of a :class:`ConfigError` (its message lists them indented)."""
    lines = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()]
    return [ln.replace("(root): Value error, ", "") for ln in lines] or [str(err)]


def _row_problems(task, split: str, rows: list[dict[str, Any]], field_name: str) -> list[str]:
    """What the reward needs, on the first rows of a split."""
    out = []
    for i, row in enumerate(rows):
        where = f"{field_name} row {i} (prompt_id {str(row.get('prompt_id', i))!r})"
        if task.name == "math":
            gold = str(row.get("answer", ""))
            text = gold if "\\boxed" in gold or "$" in gold else f"${gold}$"
            try:
                from math_verify import parse

                parsed = parse(text, parsing_timeout=5)
            except Exception as e:  # noqa: BLE001 - a parser crash is this row's problem
                parsed, gold = [], f"{gold} ({type(e).__name__})"
            if not any(not isinstance(x, str) for x in parsed):  # only the raw-text fallback, or nothing
                out.append(
                    f"{where}: answer {gold!r} does not parse as a math expression (math-verify keeps "
                    f"at most its raw text), so a correct response in another form would score 0"
                )
        elif task.name == "code" and not row.get("tests"):
            out.append(f"{where}: no parseable tests; every program would score 0")
    return out


def _seq_len(cfg: TrainConfig, max_prompt: int, notes: list[str]) -> int:
    """Longest training sequence: the tokenized prompts + sampling.max_tokens, else engine.max_model_len."""
    if max_prompt:
        return max_prompt + cfg.sampling.max_tokens
    limit = cfg.engine.max_model_len
    if limit:  # the room the token budgets leave for a prompt
        room = limit - max(cfg.sampling.max_tokens, cfg.eval.max_tokens or 0)
        notes.append(
            f"prompts not tokenized: the memory plan takes prompts of up to {room} tokens "
            f"(engine.max_model_len={limit} less the longest max_tokens)"
        )
        return min(limit, cfg.sampling.max_tokens + room)
    return cfg.sampling.max_tokens


def _plan(
    cfg: TrainConfig, max_prompt: int, shape, hw=None, notes: list[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The run's plan and the lines saying what does not fit ``hw`` (see :mod:`oapl.memory_plan`)."""
    r, a = cfg.rollout, cfg.algorithm
    responses = r.prompts_per_step * r.group_size
    offline = is_offline(cfg)
    plan: dict[str, Any] = {
        "mode": "offline" if offline else f"online ({cfg.distributed.backend} backend)",
        "steps": cfg.steps,
        "prompts_per_step": r.prompts_per_step,
        "responses_per_step": responses,
        "mini_batches": a.mini_batches,
        "optimiser_steps": cfg.steps * a.mini_batches,
        "sync_interval": r.sync_interval,
        "syncs": (cfg.steps - 1) // r.sync_interval,
        "optimiser_steps_per_sync_window": (
            "no sync within an offline epoch (L = one epoch)"
            if offline
            else f"{r.sync_interval * a.mini_batches} (L = {r.sync_interval} trainer steps x {a.mini_batches} "
            f"mini-batch{'es' if a.mini_batches > 1 else ''})"
        ),
        "samples_per_sync_window": r.sync_interval * responses,
        "samples_total": cfg.steps * responses,
        "longest_sampled_prompt_tokens": max_prompt,
        "generated_tokens_per_step_max": responses * cfg.sampling.max_tokens,
        "tokens_per_step_max": responses * (cfg.sampling.max_tokens + max_prompt),
    }
    if shape is None:
        return plan, []
    from oapl.memory_plan import Hardware, plan_memory

    plan["model_params"] = shape.params
    memory, problems = plan_memory(
        cfg, shape, _seq_len(cfg, max_prompt, notes if notes is not None else []), hw or Hardware(0, None, "detected")
    )
    plan.update(memory)
    return plan, problems


def _is_compare_study(config: str | Path | None) -> bool:
    if config is None or not Path(config).is_file():
        return False
    import yaml

    try:
        tree = yaml.safe_load(Path(config).read_text())
    except (yaml.YAMLError, UnicodeDecodeError):  # load_config says what is wrong with the file
        return False
    return isinstance(tree, dict) and "base" in tree


def run_check(
    config: str | Path | None,
    overrides: list[str] | None = None,
    *,
    rows: int = 8,
    hub: bool = True,
    gpus: int | None = None,
    gpu_memory: str | None = None,
) -> CheckResult:
    """Check a run before it starts; never raises for a problem in the input (it is listed).

    ``gpus`` / ``gpu_memory`` (``"80GiB"``): the GPUs to plan for (default: the devices present). An
    ``oapl compare`` study config (a YAML with a ``base`` section) is checked run by run: every
    problem line starts with the run's name, and ``plan`` maps run names to their plans.
    """
    from oapl.errors import UserError
    from oapl.memory_plan import detect_hardware

    res = CheckResult()
    try:
        hw = detect_hardware(gpus, gpu_memory)
    except UserError as e:
        res.problems.append(str(e))
        return res
    if config is not None and _is_compare_study(config):
        return _check_study(config, overrides, rows=rows, hub=hub, hw=hw)
    try:
        cfg: TrainConfig = load_config(config, overrides)
    except ConfigError as e:
        res.problems.extend(_config_problems(e))
        return res
    return _check_run(cfg, res, rows=rows, hub=hub, hw=hw)


def _check_study(config: str | Path, overrides: list[str] | None, *, rows: int, hub: bool, hw) -> CheckResult:
    from oapl.compare import CompareConfig, plan_runs

    res = CheckResult()
    try:
        study = load_config(config, overrides, cls=CompareConfig)
        runs = [r for r in plan_runs(study) if r.same_as is None]
    except ConfigError as e:
        res.problems.extend(_config_problems(e))
        return res
    seen: dict[str, CheckResult] = {}
    for run in runs:
        one = _check_run(run.cfg, CheckResult(), rows=rows, hub=hub, hw=hw)
        res.problems += [f"{run.key}: {p}" for p in one.problems]
        res.plan[run.key] = one.plan
        seen[run.key] = one
    res.notes = sorted({n for one in seen.values() for n in one.notes})
    return res


def _tokenize_rows(cfg: TrainConfig, task, tokenizer, shape, res: CheckResult, rows: int) -> int:
    """Check every prompt of each split against the token budgets (tokenized in batches and cached, as
    the run does before it starts: :func:`oapl.data.budget.split_problems`); the longest prompt."""
    from oapl.data.budget import split_problems

    max_prompt = 0
    limit = cfg.engine.max_model_len
    if limit is None and cfg.engine.kind != "transformers" and shape is not None:
        limit = shape.max_position_embeddings
        res.notes.append(
            f"engine.max_model_len unset: vLLM uses the model's own limit ({limit}); prompts checked against it"
        )
    eval_tokens = cfg.eval.max_tokens or cfg.sampling.max_tokens
    counted = []
    for split, examples, max_tokens, fname in (
        ("train", task.train, cfg.sampling.max_tokens, "sampling.max_tokens"),
        ("eval", task.eval, eval_tokens, "eval.max_tokens" if cfg.eval.max_tokens else "sampling.max_tokens"),
    ):
        try:
            problems, longest = split_problems(
                task, examples, tokenizer, max_tokens, limit, split=split, max_tokens_field=fname
            )
        except Exception as e:  # noqa: BLE001 - e.g. a prompt_template column a row lacks
            res.problems.append(_message(e))
            continue
        res.problems += problems
        max_prompt = max(max_prompt, longest)
        counted.append(f"{len(examples)} {split}")
    res.notes.append(f"tokenized every prompt ({', '.join(counted) or 'none'}): longest prompt {max_prompt} tokens")
    return max_prompt


def _model_problems(cfg: TrainConfig, model_path: str | None) -> list[str]:
    """What the trainer and engine refuse at start-up: damaged model files, ``engine.extra`` keys the
    engine does not take, LoRA targets that match no module (on the meta device: no weights read)."""
    out = []
    if model_path is not None:
        from oapl.trainer.model import check_model_files

        try:
            check_model_files(model_path)
        except Exception as e:  # noqa: BLE001
            out.append(_message(e))
    if cfg.engine.extra:
        from oapl.engines.factory import check_engine_extra, engine_kind

        try:
            check_engine_extra(engine_kind(cfg), cfg.engine.extra, cfg.engine.kind)
        except Exception as e:  # noqa: BLE001
            out.append(_message(e))
    if cfg.model.lora.enabled and model_path is not None and not out:
        from oapl.trainer.policy import check_lora_targets

        try:
            check_lora_targets(model_path, cfg.model.lora.target_modules, cfg.model.trust_remote_code)
        except Exception as e:  # noqa: BLE001
            out.append(_message(e))
    return out


def _shape(cfg: TrainConfig, model_path: str | None, res: CheckResult):
    from oapl.memory_plan import ShapeError, resolve_shape

    try:
        return resolve_shape(cfg.model.name, model_path, cfg.model.trust_remote_code)
    except ShapeError as e:
        res.problems.append(str(e))
        return None


def _check_run(cfg: TrainConfig, res: CheckResult, *, rows: int, hub: bool, hw=None) -> CheckResult:
    if not hub:  # check_config checks it with the names
        from oapl.trainer.model import pick_device

        try:
            pick_device(cfg.model.device)
        except Exception as e:  # noqa: BLE001
            res.problems.append(_message(e))
    if hub:
        from oapl.preflight import check_config

        try:
            check_config(cfg)
        except Exception as e:  # noqa: BLE001
            res.problems.append(_message(e))
            # nothing below can load what is not there; the memory plan of a shipped shape still can
            from oapl.memory_plan import shapes_table

            res.plan, memory_problems = _plan(cfg, 0, shapes_table().get(cfg.model.name), hw, res.notes)
            res.problems += memory_problems
            return res
    from oapl.data.tasks import build_task

    try:
        task = build_task(cfg.task, cfg.seed)
    except Exception as e:  # noqa: BLE001
        res.problems.append(_message(e))
        task = None
    max_prompt, model_path, shape = 0, None, None
    if task is not None:
        res.problems += _row_problems(task, "train", task.train[:rows], "task.dataset")
        res.problems += _row_problems(task, "eval", task.eval[:rows], "task.eval_dataset")
        try:
            from oapl.trainer.model import resolve_model_path

            model_path = resolve_model_path(cfg.model.name)
            tokenizer = load_config_tokenizer(cfg)
        except Exception as e:  # noqa: BLE001
            res.problems.append(f"model.name: cannot load the tokenizer of {cfg.model.name!r}: {_message(e)}")
            tokenizer = None
        if tokenizer is not None:
            shape = _shape(cfg, model_path, res)
            max_prompt = _tokenize_rows(cfg, task, tokenizer, shape, res, rows)
            res.problems += _model_problems(cfg, model_path)
    if shape is None and not any(p.startswith("model.name") for p in res.problems):
        shape = _shape(cfg, model_path, res)  # the plan needs no tokenizer: the shipped shapes
    if cfg.distributed.backend == "ray":
        from oapl.distributed.backend import validate

        try:
            validate(cfg)  # what the trainer ranks refuse at start-up (e.g. FSDP2 with LoRA)
        except ValueError as e:
            res.problems.append(_message(e))
    if is_offline(cfg):
        try:
            from oapl.data.rollouts import read_rollouts
            from oapl.backends.offline import check_sampling_provenance

            check_sampling_provenance(read_rollouts(str(cfg.offline.data), with_tokens=False), cfg)
        except Exception as e:  # noqa: BLE001
            res.problems.append(_message(e))
    res.plan, memory_problems = _plan(cfg, max_prompt, shape, hw, res.notes)
    res.problems += memory_problems
    if shape is not None:
        from oapl.preflight import check_environment

        env, env_problems = check_environment(cfg, shape, res.plan, hw)
        res.plan["environment"] = env
        res.problems += env_problems
    return res


def format_plan(plan: dict[str, Any], indent: str = "  ") -> list[str]:
    lines = []
    for key, value in plan.items():
        if isinstance(value, dict):  # one plan per run of a compare study, or a part of the memory plan
            lines.append(f"{indent}{key}:")
            lines += format_plan(value, indent + "  ")
            continue
        if isinstance(value, float):
            value = f"{value:.1f}"
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        lines.append(f"{indent}{key}: {value}")
    return lines


def cmd_check(args) -> int:
    from oapl.cli.args import split_config

    config, overrides = split_config(args)
    res = run_check(config, overrides, rows=args.rows, hub=not args.no_hub, gpus=args.gpus, gpu_memory=args.gpu_memory)
    if res.problems:
        for line in res.problems:
            print(line)
        if any(p.startswith(("GPU memory", "GPUs:", "disk:")) for p in res.problems):
            print("the plan, which does not fit:")
            print("\n".join(format_plan(res.plan)))
        return 2
    for note in res.notes:
        print(f"note: {note}")
    print(f"oapl check: {config or 'defaults'} is ready to run")
    print("\n".join(format_plan(res.plan)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("check", help="validate a config, open its datasets, check token budgets, print the plan")
    p.add_argument("config", nargs="?", help="YAML config (the same file `oapl train` takes)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument(
        "--rows",
        type=int,
        default=8,
        help="rows of each split whose answers/tests are checked (default 8); every prompt is tokenized",
    )
    p.add_argument("--no-hub", action="store_true", help="skip the Hugging Face Hub name lookups")
    p.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="GPUs to plan for (default: the devices present; none on a CPU-only machine)",
    )
    p.add_argument(
        "--gpu-memory",
        default=None,
        metavar="SIZE",
        help="memory of each GPU, e.g. 80GiB or 141GB (default: the first device's)",
    )
    p.set_defaults(func=cmd_check)
