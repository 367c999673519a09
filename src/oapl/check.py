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
4. those rows, rendered with the chat template and tokenized, fit ``engine.max_model_len`` with
   ``sampling.max_tokens`` (training) and ``eval.max_tokens`` (evaluation);
5. offline data (``offline.data``) was sampled at the configured temperature / top-p by
   ``model.name``.

Then the plan: steps, batch and mini-batches, syncs, samples per sync window, tokens per step, and
an estimate of trainer and engine memory per GPU from the model's shapes. :func:`run_check` returns
it all; the command prints the plan and exits 0, or prints one line per problem and exits 2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oapl.config import ConfigError, TrainConfig, load_config

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
                out.append(f"{where}: answer {gold!r} does not parse as a math expression (math-verify keeps "
                           f"at most its raw text), so a correct response in another form would score 0")
        elif task.name == "code" and not row.get("tests"):
            out.append(f"{where}: no parseable tests; every program would score 0")
    return out


def _model_shapes(cfg: TrainConfig, path: str) -> dict[str, Any] | None:
    """Parameter count and KV-cache shape from the model's config (no weights loaded)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        mcfg = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.model.trust_remote_code)
        params = sum(p.numel() for p in model.parameters())
    except Exception as e:  # noqa: BLE001 - the plan is best effort; the run itself would say more
        log.debug("model shapes unavailable: %s", e)
        return None
    text = getattr(mcfg, "text_config", None) or mcfg
    heads = getattr(text, "num_attention_heads", 1)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return {"params": params, "layers": text.num_hidden_layers, "hidden": text.hidden_size,
            "vocab": text.vocab_size, "kv_bytes_per_token_bf16": 2 * text.num_hidden_layers * kv_heads * head_dim * 2,
            "max_position_embeddings": getattr(text, "max_position_embeddings", None)}


def _memory(cfg: TrainConfig, shapes: dict[str, Any], max_prompt: int) -> dict[str, Any]:
    """Per-GPU estimates (GB), from the shapes; see docs/paper-settings.md for the arithmetic."""
    import torch

    m, d = cfg.model, cfg.distributed
    cuda = (m.device.startswith("cuda") or cfg.engine.kind == "vllm" or
            (m.device == "auto" and torch.cuda.is_available()))
    compute_bytes = 2 if (m.compute_dtype in ("bfloat16", "float16") or (m.compute_dtype == "auto" and cuda)) else 4
    p = shapes["params"]
    if m.lora.enabled:
        state = p * compute_bytes  # frozen base; the adapters are small
        state_note = f"LoRA: frozen base in {compute_bytes}-byte compute dtype"
    elif m.param_dtype in ("bfloat16", "float16"):
        state = p * 8
        state_note = "pure 16-bit weights, gradients and AdamW state (8 B/parameter)"
    else:
        state = p * 16
        state_note = "fp32 masters, gradients and AdamW state (16 B/parameter)"
    shards = d.trainer_workers if (d.backend == "ray" and d.trainer_num_gpus >= 1) else 1
    seq = max_prompt + cfg.sampling.max_tokens
    tokens = cfg.optim.max_tokens_per_micro_batch or cfg.optim.micro_batch_size * seq
    per_token = shapes["layers"] * shapes["hidden"] * compute_bytes if m.gradient_checkpointing else \
        shapes["layers"] * shapes["hidden"] * compute_bytes * 16
    logits = min(m.logprob_chunk_size, tokens) * shapes["vocab"] * 4 * 3
    working = tokens * per_token + logits
    out = {"trainer_state_gb": state / shards / GB, "trainer_state": state_note + (f", sharded over {shards} ranks"
                                                                                  if shards > 1 else ""),
           "trainer_working_set_gb": working / GB, "trainer_tokens_per_micro_batch": tokens}
    kv = shapes["kv_bytes_per_token_bf16"]
    limit = cfg.engine.max_model_len or shapes.get("max_position_embeddings")
    out.update(engine_weights_gb=p * 2 / GB, kv_cache_kib_per_token=kv / 1024,
               kv_cache_gb_per_full_sequence=(kv * limit / GB) if limit else None)
    return out


def _plan(cfg: TrainConfig, max_prompt: int, shapes: dict[str, Any] | None) -> dict[str, Any]:
    r, a = cfg.rollout, cfg.algorithm
    responses = r.prompts_per_step * r.group_size
    plan: dict[str, Any] = {
        "mode": "offline" if cfg.offline.data else f"online ({cfg.distributed.backend} backend)",
        "steps": cfg.steps, "prompts_per_step": r.prompts_per_step, "responses_per_step": responses,
        "mini_batches": a.mini_batches, "optimiser_steps": cfg.steps * a.mini_batches,
        "sync_interval": r.sync_interval, "syncs": (cfg.steps - 1) // r.sync_interval,
        "samples_per_sync_window": r.sync_interval * responses, "samples_total": cfg.steps * responses,
        "longest_sampled_prompt_tokens": max_prompt,
        "generated_tokens_per_step_max": responses * cfg.sampling.max_tokens,
        "tokens_per_step_max": responses * (cfg.sampling.max_tokens + max_prompt),
    }
    if shapes is not None:
        plan["model_params"] = shapes["params"]
        plan.update(_memory(cfg, shapes, max_prompt))
    return plan


def _is_compare_study(config: str | Path | None) -> bool:
    if config is None or not Path(config).is_file():
        return False
    import yaml

    try:
        tree = yaml.safe_load(Path(config).read_text())
    except yaml.YAMLError:
        return False
    return isinstance(tree, dict) and "base" in tree


def run_check(config: str | Path | None, overrides: list[str] | None = None, *, rows: int = 8,
              hub: bool = True) -> CheckResult:
    """Check a run before it starts; never raises for a problem in the input (it is listed).

    An ``oapl compare`` study config (a YAML with a ``base`` section) is checked run by run: every
    problem line starts with the run's name, and ``plan`` maps run names to their plans.
    """
    if _is_compare_study(config):
        return _check_study(config, overrides, rows=rows, hub=hub)
    res = CheckResult()
    try:
        cfg: TrainConfig = load_config(config, overrides)
    except ConfigError as e:
        res.problems.extend(_config_problems(e))
        return res
    return _check_run(cfg, res, rows=rows, hub=hub)


def _check_study(config: str | Path, overrides: list[str] | None, *, rows: int, hub: bool) -> CheckResult:
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
        one = _check_run(run.cfg, CheckResult(), rows=rows, hub=hub)
        res.problems += [f"{run.key}: {p}" for p in one.problems]
        res.plan[run.key] = one.plan
        seen[run.key] = one
    res.notes = sorted({n for one in seen.values() for n in one.notes})
    return res


def _check_run(cfg: TrainConfig, res: CheckResult, *, rows: int, hub: bool) -> CheckResult:
    if hub:
        from oapl.preflight import check_config

        try:
            check_config(cfg)
        except Exception as e:  # noqa: BLE001
            res.problems.append(_message(e))
            return res  # nothing below can load what is not there
    from oapl.data.budget import TokenBudgetError, check_prompt_budget
    from oapl.data.tasks import build_task

    try:
        task = build_task(cfg.task, cfg.seed)
    except Exception as e:  # noqa: BLE001
        res.problems.append(_message(e))
        task = None
    max_prompt = 0
    shapes = None
    if task is not None:
        res.problems += _row_problems(task, "train", task.train[:rows], "task.dataset")
        res.problems += _row_problems(task, "eval", task.eval[:rows], "task.eval_dataset")
        try:
            from oapl.trainer.model import load_tokenizer, resolve_model_path

            model_path = resolve_model_path(cfg.model.name)
            tokenizer = load_tokenizer(resolve_model_path(cfg.model.tokenizer) if cfg.model.tokenizer else model_path,
                                       cfg.model.trust_remote_code)
        except Exception as e:  # noqa: BLE001
            res.problems.append(f"model.name: cannot load the tokenizer of {cfg.model.name!r}: {_message(e)}")
            tokenizer = model_path = None
        if tokenizer is not None:
            shapes = _model_shapes(cfg, model_path)
            limit = cfg.engine.max_model_len
            if limit is None and cfg.engine.kind != "transformers" and shapes is not None:
                limit = shapes.get("max_position_embeddings")
                res.notes.append(f"engine.max_model_len unset: vLLM uses the model's own limit ({limit}); "
                                 "prompts checked against it")
            eval_tokens = cfg.eval.max_tokens or cfg.sampling.max_tokens
            for split, examples, max_tokens, fname in (
                    ("train", task.train[:rows], cfg.sampling.max_tokens, "sampling.max_tokens"),
                    ("eval", task.eval[:rows], eval_tokens, "eval.max_tokens")):
                for i, ex in enumerate(examples):
                    try:
                        n = len(tokenizer(task.render(ex, tokenizer), add_special_tokens=False).input_ids)
                        max_prompt = max(max_prompt, n)
                        check_prompt_budget(n, max_tokens, limit, split=split, row=i,
                                            prompt_id=str(ex.get("prompt_id", i)), max_tokens_field=fname)
                    except TokenBudgetError as e:
                        res.problems.append(str(e))
                    except Exception as e:  # noqa: BLE001 - e.g. a prompt_template column the row lacks
                        res.problems.append(_message(e))
            res.notes.append(f"tokenized the first {rows} rows of each split: longest prompt {max_prompt} tokens")
    if cfg.offline.data:
        try:
            from oapl.data.rollouts import read_rollouts
            from oapl.offline import check_sampling_provenance

            check_sampling_provenance(read_rollouts(cfg.offline.data, with_tokens=False), cfg)
        except Exception as e:  # noqa: BLE001
            res.problems.append(_message(e))
    res.plan = _plan(cfg, max_prompt, shapes)
    return res


def format_plan(plan: dict[str, Any], indent: str = "  ") -> list[str]:
    lines = []
    for key, value in plan.items():
        if isinstance(value, dict):  # one plan per run of a compare study
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
    res = run_check(config, overrides, rows=args.rows, hub=not args.no_hub)
    if res.problems:
        for line in res.problems:
            print(line)
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
    p.add_argument("--rows", type=int, default=8, help="rows of each split to check and tokenize (default 8)")
    p.add_argument("--no-hub", action="store_true", help="skip the Hugging Face Hub name lookups")
    p.set_defaults(func=cmd_check)
