"""A typical TRL GRPO script: conversational data, two rewards reading extra columns, LoRA, an eval set,
two TrainerCallbacks, save/logging steps and a seed. oapl_script.py is the same script on oapl; the
two differ in three lines (tests/test_trl_compat.py diffs them and runs the oapl one on a tiny model)."""

import os

from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

MODEL = os.environ.get("PORT_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
OUTPUT_DIR = os.environ.get("PORT_OUTPUT_DIR", "runs/port")


def make_rows(n, offset=0):
    rows = []
    for i in range(offset, offset + n):
        rows.append(
            {"prompt": [{"role": "user", "content": f"Say {i % 10}."}], "answer": str(i % 10), "max_chars": 4 + i % 3}
        )
    return rows


def correct(completions, answer, **kwargs):
    """1.0 when the reply contains the answer column's digit."""
    return [float(a in c[0]["content"]) for c, a in zip(completions, answer)]


def brief(completions, max_chars, **kwargs):
    """1.0 when the reply is at most max_chars characters long (a column too)."""
    return [float(len(c[0]["content"]) <= m) for c, m in zip(completions, max_chars)]


class PrintLogs(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            print(f"LOG step={state.global_step} reward={logs['reward']:.3f} lr={logs['learning_rate']:.2e}")


class Milestones(TrainerCallback):
    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        print(f"EVAL step={state.global_step} {sorted(metrics)}")

    def on_save(self, args, state, control, **kwargs):
        print(f"SAVE step={state.global_step}")


if __name__ == "__main__":
    train_dataset = Dataset.from_list(make_rows(32))
    eval_dataset = Dataset.from_list(make_rows(4, offset=100))
    training_args = GRPOConfig(
        output_dir=OUTPUT_DIR,
        max_steps=4,
        learning_rate=1e-4,
        num_generations=4,
        per_device_train_batch_size=8,
        max_completion_length=8,
        logging_steps=2,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        seed=0,
        use_cpu=True,
        bf16=False,
        report_to="none",
    )
    trainer = GRPOTrainer(
        model=MODEL,
        reward_funcs=[correct, brief],
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"),
        callbacks=[PrintLogs(), Milestones()],
    )
    result = trainer.train()
    trainer.save_model()
    print(f"DONE global_step={result.global_step}")
