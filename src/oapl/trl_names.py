"""TRL's ``GRPOConfig`` names and what each is in oapl: the one table :class:`~oapl.trl_config.OAPLConfig`,
its ``HfArgumentParser`` fields, its TRL-name properties and docs/coming-from-trl.md are made from.

A name either maps onto oapl field(s) (:data:`TRL_FIELDS`; how its value is translated is
:func:`oapl.trl_config._translate`, how it reads back is :data:`TRL_READ`) or is accepted only at
the value(s) that mean what oapl does anyway (:data:`TRL_NOOP`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["TRL_DEFAULTS", "TRL_FIELDS", "TRL_NOOP", "TRL_READ", "TRL_TABLE", "TRLField", "UNSET", "docs_table"]


class _Unset:
    """The default of every ``HfArgumentParser`` argument of ``OAPLConfig``: not given on the command line."""

    def __repr__(self) -> str:
        return "unset"


UNSET = _Unset()


@dataclass(frozen=True)
class TRLField:
    """A TRL ``GRPOConfig`` (or ``AsyncGRPOConfig``) name: where it goes in oapl, or the only values accepted.

    ``simple``: the value goes unchanged to ``target``. ``accepted``: a name with no oapl counterpart,
    taken only at the value(s) that mean what oapl does anyway (``()``: at no value). ``type``: the
    type ``HfArgumentParser`` / ``TrlParser`` parse it as.
    """

    name: str
    target: str  # the oapl field(s), for the docs and error messages ("" for an accepted-only name)
    note: str = ""
    type: Any = str
    simple: bool = False
    accepted: tuple[Any, ...] | None = None


_Opt = Optional  # HfArgumentParser reads typing.Optional[X] (X | None in Python >= 3.10 too)

#: Every TRL name ``OAPLConfig`` knows, in the order of the docs table: mapped, then accepted only at some values.
TRL_TABLE: dict[str, TRLField] = {
    f.name: f
    for f in [
        TRLField(
            "output_dir",
            "output_dir",
            "The run directory; a non-empty one is refused unless resuming "
            "or `overwrite_output_dir=True` (a start that failed before training a step is replaced).",
            _Opt[str],
        ),
        TRLField(
            "overwrite_output_dir",
            "(`oapl train --overwrite`)",
            "Replace the run in a non-empty `output_dir`.",
            _Opt[bool],
        ),
        TRLField("seed", "seed", "", _Opt[int]),
        TRLField(
            "max_steps",
            "steps",
            "Trainer steps (one optimiser step per batch, or `algorithm.mini_batches`).",
            _Opt[int],
        ),
        TRLField(
            "num_train_epochs",
            "steps",
            "`ceil(epochs x training prompts / prompts per step)`, counted by "
            "`OAPLTrainer`; `max_steps` wins when both are set, as in TRL.",
            _Opt[float],
        ),
        TRLField("learning_rate", "optim.lr", "", _Opt[float], simple=True),
        TRLField(
            "lr_scheduler_type",
            "optim.schedule",
            "Unset: `linear` (decay to 0 after the warm-up), as TRL. "
            "`constant`, `constant_with_warmup` -> constant; `cosine`, `cosine_with_min_lr` -> cosine.",
            _Opt[str],
        ),
        TRLField(
            "warmup_steps", "optim.warmup_steps", "A float in [0, 1) is a ratio: `optim.warmup_ratio`.", _Opt[float]
        ),
        TRLField("warmup_ratio", "optim.warmup_ratio", "", _Opt[float], simple=True),
        TRLField("weight_decay", "optim.weight_decay", "", _Opt[float], simple=True),
        TRLField("adam_beta1", "optim.betas[0]", "", _Opt[float]),
        TRLField("adam_beta2", "optim.betas[1]", "oapl's default is 0.95 (TRL: 0.999).", _Opt[float]),
        TRLField("adam_epsilon", "optim.eps", "", _Opt[float], simple=True),
        TRLField("max_grad_norm", "optim.max_grad_norm", "0 = no clipping.", _Opt[float]),
        TRLField(
            "per_device_train_batch_size",
            "optim.micro_batch_size, rollout.prompts_per_step",
            "Completions per forward/backward. Completions per step = this x `gradient_accumulation_steps` "
            "(must be a multiple of `num_generations`), so prompts per step = that / `num_generations`. "
            "Unset: TRL's 8 x 1 = 8 completions per step (unless `rollout.prompts_per_step` is given).",
            _Opt[int],
        ),
        TRLField(
            "gradient_accumulation_steps", "rollout.prompts_per_step", "See `per_device_train_batch_size`.", _Opt[int]
        ),
        TRLField(
            "generation_batch_size",
            "rollout.prompts_per_generate",
            "Completions per engine call / `num_generations`. Unset: the completions of one step, as TRL.",
            _Opt[int],
        ),
        TRLField(
            "num_generations",
            "rollout.group_size",
            "G, responses per prompt (default 8, as TRL).",
            _Opt[int],
            simple=True,
        ),
        TRLField(
            "num_generations_eval",
            "eval.n",
            "Samples per held-out prompt (pass@k up to k = n).",
            _Opt[int],
            simple=True,
        ),
        TRLField("max_completion_length", "sampling.max_tokens", "", _Opt[int], simple=True),
        TRLField("temperature", "sampling.temperature", "", _Opt[float], simple=True),
        TRLField(
            "top_p",
            "sampling.top_p",
            "Must stay 1.0 for OAPL (the trainer scores the full distribution).",
            _Opt[float],
            simple=True,
        ),
        TRLField(
            "use_vllm",
            "engine.kind",
            "true -> vllm, false -> transformers (oapl's default `auto` uses vLLM when installed).",
            _Opt[bool],
        ),
        TRLField("vllm_gpu_memory_utilization", "engine.gpu_memory_utilization", "", _Opt[float], simple=True),
        TRLField("vllm_max_model_length", "engine.max_model_len", "", _Opt[int], simple=True),
        TRLField(
            "vllm_enable_sleep_mode",
            "engine.enable_sleep_mode",
            "Needs `rollout.asynchronous=false`.",
            _Opt[bool],
            simple=True,
        ),
        TRLField(
            "weight_sync_steps",
            "rollout.sync_interval",
            "`AsyncGRPOConfig`'s name for L, the trainer steps "
            "between weight syncs (the policy lag). oapl's default is 50 (TRL's: 1); see \"Choosing L and "
            'beta2" below. A run of `max_steps` <= L never syncs before its end: a warning says so.',
            _Opt[int],
            simple=True,
        ),
        TRLField(
            "max_staleness",
            "rollout.max_staleness",
            "`AsyncGRPOConfig`; must be 0 for OAPL (the buffer is "
            "cleared at every sync), 1 gives GRPO's off-by-one asynchrony.",
            _Opt[int],
            simple=True,
        ),
        TRLField(
            "epsilon", "algorithm.clip_eps", "GRPO baseline only (OAPL has no clipping).", _Opt[float], simple=True
        ),
        TRLField(
            "scale_rewards",
            "algorithm.scale_advantages",
            "`group`/true -> true, `none`/false -> false (GRPO).",
            _Opt[str],
        ),
        TRLField(
            "vllm_importance_sampling_correction",
            "algorithm.is_cap",
            "false -> null (no correction; GRPO).",
            _Opt[bool],
        ),
        TRLField(
            "vllm_importance_sampling_cap",
            "algorithm.is_cap",
            "The truncated-IS cap C (GRPO).",
            _Opt[float],
            simple=True,
        ),
        TRLField("reward_weights", "task.reward_weights", "", _Opt[list[float]], simple=True),
        TRLField(
            "eval_strategy",
            "eval.every, eval.at_start, eval.at_end",
            "`no` -> no held-out evaluation; "
            "`steps` -> every `eval_steps`. oapl also evaluates before and after training by default.",
            _Opt[str],
        ),
        TRLField("eval_steps", "eval.every", "A float in [0, 1) is a share of `max_steps`.", _Opt[float]),
        TRLField("eval_on_start", "eval.at_start", "", _Opt[bool], simple=True),
        TRLField(
            "save_strategy",
            "checkpoint.every",
            "`no` -> only the final checkpoint (which `save_model` and "
            "`evaluate` read); `steps` -> every `save_steps`.",
            _Opt[str],
        ),
        TRLField("save_steps", "checkpoint.every", "A float in [0, 1) is a share of `max_steps`.", _Opt[float]),
        TRLField("save_total_limit", "checkpoint.keep", "", _Opt[int], simple=True),
        TRLField(
            "logging_steps",
            "(`on_log` and `log_history`)",
            "As TRL (default 10; a float in (0, 1) "
            "is a share of `max_steps`): `TrainerCallback.on_log` and `log_history` get the mean of the last "
            "`logging_steps` steps. metrics.jsonl and plain-function callbacks still get every step.",
            _Opt[float],
        ),
        TRLField(
            "log_completions",
            "logging.log_samples_every",
            "true -> sample completions to samples.jsonl every `logging_steps`.",
            _Opt[bool],
        ),
        TRLField(
            "report_to",
            "logging.tensorboard, logging.wandb",
            "`none`, `tensorboard`, `wandb`, `all`, or a list.",
            _Opt[str],
        ),
        TRLField("disable_tqdm", "logging.progress", "", _Opt[bool]),
        TRLField(
            "gradient_checkpointing",
            "model.gradient_checkpointing",
            "oapl's default is false (TRL: true).",
            _Opt[bool],
            simple=True,
        ),
        TRLField(
            "bf16", "model.compute_dtype", "true -> bfloat16 (over fp32 master weights), false -> float32.", _Opt[bool]
        ),
        TRLField("torch_compile", "model.compile", "", _Opt[bool], simple=True),
        TRLField("use_liger_kernel", "model.liger", "", _Opt[bool], simple=True),
        TRLField("trust_remote_code", "model.trust_remote_code", "", _Opt[bool], simple=True),
        TRLField("use_cpu", "model.device", "true -> cpu.", _Opt[bool]),
        # -- accepted only at the value(s) that mean what oapl does anyway --------------------------------------
        TRLField(
            "beta",
            "",
            "TRL's KL penalty towards a frozen reference model; oapl has no reference model "
            "(OAPL's KL is towards the lagged inference policy, algorithm.beta2, another quantity)",
            _Opt[float],
            accepted=(0, 0.0, None),
        ),
        TRLField(
            "num_iterations",
            "",
            "every batch is used once; algorithm.mini_batches splits it into optimiser steps",
            _Opt[int],
            accepted=(1,),
        ),
        TRLField(
            "steps_per_generation",
            "",
            "the engine generates asynchronously into a buffer; weight_sync_steps "
            "(rollout.sync_interval) sets how many steps use one engine version",
            _Opt[int],
            accepted=(None,),
        ),
        TRLField(
            "top_k",
            "",
            "OAPL needs the log-probs of the distribution the engine sampled from: only "
            "temperature (and top_p=1) are supported",
            _Opt[int],
            accepted=(0, None, -1),
        ),
        TRLField("min_p", "", "only temperature (and top_p=1) are supported", _Opt[float], accepted=(None, 0, 0.0)),
        TRLField(
            "repetition_penalty", "", "only temperature (and top_p=1) are supported", _Opt[float], accepted=(1, 1.0)
        ),
        TRLField("generation_kwargs", "", "only temperature (and top_p=1) are supported", _Opt[str], accepted=(None,)),
        TRLField(
            "remove_unused_columns",
            "",
            "oapl passes every dataset column to the reward functions",
            _Opt[bool],
            accepted=(False,),
        ),
        TRLField(
            "shuffle_dataset",
            "",
            "oapl always samples prompts in a seeded shuffled order",
            _Opt[bool],
            accepted=(True,),
        ),
        TRLField(
            "mask_truncated_completions",
            "",
            "truncated completions are trained on with their reward",
            _Opt[bool],
            accepted=(False,),
        ),
        TRLField(
            "disable_dropout",
            "",
            "oapl trains with the model's own dropout setting (0 for most LLMs)",
            _Opt[bool],
            accepted=(False,),
        ),
        TRLField(
            "fp16", "", "use bf16=True (bfloat16 compute over fp32 master weights)", _Opt[bool], accepted=(False, None)
        ),
        TRLField(
            "vllm_mode",
            "",
            "oapl runs its engines itself: in this process (distributed.backend=local) or as "
            "Ray actors (distributed.backend=ray); there is no vLLM server mode",
            _Opt[str],
            accepted=("colocate",),
        ),
        TRLField(
            "loss_type",
            "",
            "oapl's objective is algorithm='oapl' (squared regression to V*, the default) or "
            "algorithm='grpo' (PPO clip with truncated importance sampling, the baseline)",
            _Opt[str],
            accepted=(),
        ),
        TRLField(
            "max_prompt_length",
            "",
            "oapl never truncates a prompt; one that does not fit engine.max_model_len is refused, naming its row",
            _Opt[int],
            accepted=(None,),
        ),
        TRLField(
            "per_device_eval_batch_size",
            "",
            "held-out prompts are generated in batches of "
            "engine.max_batch_size sequences (transformers engine) or all at once (vLLM)",
            _Opt[int],
            accepted=(),
        ),
    ]
}

#: The TRL names oapl maps onto its fields.
TRL_FIELDS: dict[str, TRLField] = {k: f for k, f in TRL_TABLE.items() if f.accepted is None}
#: TRL names oapl accepts only at the value(s) that mean what oapl does anyway: (values, reason).
TRL_NOOP: dict[str, tuple[tuple[Any, ...], str]] = {
    k: (f.accepted, f.note) for k, f in TRL_TABLE.items() if f.accepted is not None
}

#: TRL's defaults that ``OAPLConfig`` applies when neither the TRL name nor the oapl field is given.
TRL_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "linear",
    "logging_steps": 10,
}

#: How a TRL name reads back from the fields, where it is not its ``target`` unchanged.
TRL_READ: dict[str, Any] = {
    "max_steps": lambda c: c.steps,
    "lr_scheduler_type": lambda c: c.optim.schedule,
    "warmup_steps": lambda c: c.optim.warmup_steps,
    "adam_beta1": lambda c: c.optim.betas[0],
    "adam_beta2": lambda c: c.optim.betas[1],
    "max_grad_norm": lambda c: c.optim.max_grad_norm or 0.0,
    "per_device_train_batch_size": lambda c: c.optim.micro_batch_size,
    "gradient_accumulation_steps": lambda c: max(
        1, c.rollout.prompts_per_step * c.rollout.group_size // c.optim.micro_batch_size
    ),
    "generation_batch_size": lambda c: c.rollout.prompts_per_generate * c.rollout.group_size,
    "use_vllm": lambda c: c.engine.kind == "vllm",
    "scale_rewards": lambda c: "group" if c.algorithm.scale_advantages else "none",
    "vllm_importance_sampling_correction": lambda c: c.algorithm.is_cap is not None,
    "eval_strategy": lambda c: "steps" if c.eval.every else "no",
    "eval_steps": lambda c: c.eval.every or None,
    "save_strategy": lambda c: "steps" if c.checkpoint.every else "no",
    "save_steps": lambda c: c.checkpoint.every or None,
    "log_completions": lambda c: c.logging.log_samples_every > 0,
    "report_to": lambda c: [n for n in ("tensorboard", "wandb") if getattr(c.logging, n)] or "none",
    "disable_tqdm": lambda c: not c.logging.progress,
    "bf16": lambda c: c.model.compute_dtype == "bfloat16",
    "use_cpu": lambda c: c.model.device == "cpu",
}


def docs_table() -> str:
    """The markdown table "TRL GRPOConfig field -> oapl field" (docs/coming-from-trl.md)."""
    lines = ["| TRL `GRPOConfig` field | oapl field | notes |", "|---|---|---|"]
    for f in TRL_FIELDS.values():
        target = ", ".join(f"`{t}`" if not t.startswith("(") else t for t in f.target.split(", "))
        lines.append(f"| `{f.name}` | {target} | {f.note} |")
    for name, (values, reason) in TRL_NOOP.items():
        ok = ", ".join(f"`{v!r}`" for v in values)
        accepted = f"accepted only as {ok}: " if values else "not supported: "
        lines.append(f"| `{name}` | — | {accepted}{reason} |")
    return "\n".join(lines)
