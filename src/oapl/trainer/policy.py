"""The trainer: a Hugging Face causal LM minimising the OAPL (or GRPO) loss on buffer data."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator

import torch

from oapl.config import TrainConfig
from oapl.objectives import (group_normalized_advantage, grpo_loss, oapl_loss, optimal_value,
                             sequence_log_ratio)
from oapl.rollout.buffer import RolloutGroup
from oapl.trainer.logprobs import TokenBatch, token_logprobs
from oapl.trainer.model import load_causal_lm, load_tokenizer, pick_device, pick_dtype, resolve_model_path
from oapl.trainer.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class Policy:
    """Model + optimiser + schedule, and one method per thing Algorithm 1 asks of the trainer."""

    def __init__(self, cfg: TrainConfig, total_steps: int, model=None, tokenizer=None) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.model.device)
        self.dtype = pick_dtype(cfg.model.dtype, self.device)
        self.model_path = resolve_model_path(cfg.model.name)
        self.tokenizer = tokenizer or load_tokenizer(
            resolve_model_path(cfg.model.tokenizer) if cfg.model.tokenizer else self.model_path,
            cfg.model.trust_remote_code)
        base = model if model is not None else load_causal_lm(self.model_path, self.dtype, self.device,
                                                              cfg.model.trust_remote_code)
        if cfg.model.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
        self.lora = cfg.model.lora.enabled
        if self.lora:
            from peft import LoraConfig, get_peft_model

            lc = cfg.model.lora
            base = get_peft_model(base, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                   target_modules=lc.target_modules, task_type="CAUSAL_LM"))
        self.model = base
        self.model.train()
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total_steps)
        self.reference = None  # frozen copy of the sampling weights (reference_logprobs=recompute)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # ----------------------------------------------------------------------------------------
    def engine_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Current weights under Hugging Face names (LoRA merged), for the inference engine."""
        if not self.lora:
            for name, p in self.model.named_parameters():
                yield name, p.detach()
            return
        self.model.merge_adapter()
        try:
            for name, p in self.model.get_base_model().named_parameters():
                if "lora_" in name:
                    continue
                yield name.replace(".base_layer", ""), p.detach().clone()
        finally:
            self.model.unmerge_adapter()

    def hf_model(self):
        """A plain transformers model with the current weights (merged copy when LoRA is on)."""
        if not self.lora:
            return self.model
        return copy.deepcopy(self.model).merge_and_unload()

    def snapshot_reference(self) -> None:
        """Freeze a copy of the current weights as pi_inf (``reference_logprobs: recompute``)."""
        ref = copy.deepcopy(self.hf_model() if self.lora else self.model)
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        self.reference = ref

    # ----------------------------------------------------------------------------------------
    def _batch(self, groups: list[RolloutGroup]) -> TokenBatch:
        prompts, responses, ref = [], [], []
        for g in groups:
            for toks, lps in zip(g.response_token_ids, g.response_logprobs):
                prompts.append(g.prompt_token_ids)
                responses.append(toks)
                ref.append(lps)
        return TokenBatch.from_sequences(prompts, responses, ref, self.pad_token_id)

    def _advantages(self, groups: list[RolloutGroup]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence advantages and per-group V* (OAPL) / mean reward (GRPO)."""
        algo = self.cfg.algorithm
        advs, vals = [], []
        for g in groups:
            r = torch.tensor(g.rewards, dtype=torch.float64)
            if algo.name == "oapl":
                v = optimal_value(r, algo.beta1)
                advs.append(r - v)
            else:
                v = r.mean()
                advs.append(group_normalized_advantage(r, scale=algo.scale_advantages))
            vals.append(v)
        return torch.cat(advs).float(), torch.stack(vals).float()

    def train_step(self, groups: list[RolloutGroup]) -> dict[str, float]:
        """One optimiser step on the batch; returns metrics. A non-finite loss skips the update."""
        cfg = self.cfg
        t0 = time.perf_counter()
        batch = self._batch(groups)
        adv, values = self._advantages(groups)
        n = batch.input_ids.shape[0]
        mb = cfg.optim.micro_batch_size
        temp = cfg.sampling.temperature if cfg.sampling.temperature > 0 else 1.0
        chunk = cfg.model.logprob_chunk_size
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        finite = True
        s_all, ent_all, lp_all, ref_all, mask_all = [], [], [], [], []
        extra: dict[str, float] = {}
        for start in range(0, n, mb):
            sl = slice(start, start + mb)
            mbatch = batch.slice(sl).to(self.device)
            mask = mbatch.response_mask
            ref_lp = mbatch.ref_logprobs
            if cfg.algorithm.reference_logprobs == "recompute" and self.reference is not None:
                with torch.no_grad():
                    ref_lp, _ = token_logprobs(self.reference, mbatch, temp, chunk)
            logp, ent = token_logprobs(self.model, mbatch, temp, chunk, with_entropy=True)
            a = adv[sl].to(self.device)
            if cfg.algorithm.name == "oapl":
                loss = oapl_loss(logp, ref_lp, mask, a, cfg.algorithm.beta2, num_sequences=n)
            else:
                old = logp.detach()
                inf = ref_lp if cfg.algorithm.is_cap is not None else None
                loss, st = grpo_loss(logp, old, inf, mask, a, cfg.algorithm.clip_eps,
                                     cfg.algorithm.is_cap, num_sequences=n)
                for k, v in st.items():
                    extra[k] = extra.get(k, 0.0) + float(v) * mbatch.input_ids.shape[0] / n
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            total_loss += float(loss.detach())
            with torch.no_grad():
                s_all.append(sequence_log_ratio(logp.detach(), ref_lp, mask).cpu())
                ent_all.append(ent.cpu())
                lp_all.append(logp.detach().cpu())
                ref_all.append(ref_lp.detach().cpu())
                mask_all.append(mask.cpu())
        grad_norm = float("nan")
        if finite:
            params = [p for p in self.model.parameters() if p.requires_grad]
            max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            finite = math.isfinite(grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        if finite:
            self.optimizer.step()
        else:
            log.warning("non-finite loss or gradient: step skipped, weights untouched")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        elapsed = time.perf_counter() - t0
        rewards = torch.tensor([r for g in groups for r in g.rewards])
        lengths = torch.tensor([len(t) for g in groups for t in g.response_token_ids], dtype=torch.float32)
        metrics = {
            "loss": total_loss if finite else float("nan"),
            "skipped": 0.0 if finite else 1.0,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "v_star_mean" if cfg.algorithm.name == "oapl" else "baseline_mean": float(values.mean()),
            "adv_mean": float(adv.mean()),
            "adv_std": float(adv.std(unbiased=False)),
            "grad_norm": grad_norm,
            "lr": lr,
            "response_len_mean": float(lengths.mean()),
            "truncated_frac": sum(f == "length" for g in groups for f in g.finish_reasons) / max(1, n),
            "train_seconds": elapsed,
            "train_tokens_per_s": float(batch.attention_mask.sum()) / max(elapsed, 1e-9),
            **extra,
        }
        if s_all:
            metrics.update(mismatch_metrics(torch.cat([x.flatten() for x in lp_all]),
                                            torch.cat([x.flatten() for x in ref_all]),
                                            torch.cat([x.flatten() for x in mask_all]),
                                            torch.cat(s_all)))
            m = torch.cat([x.flatten() for x in mask_all])
            e = torch.cat([x.flatten() for x in ent_all])
            metrics["entropy"] = float((e * m).sum() / m.sum().clamp(min=1))
            # Monte-Carlo sequence entropy of pi_inf: E_{y~pi_inf}[-log pi_inf(y)]
            seq_nll = [-(r * mk).sum(-1) for r, mk in zip(ref_all, mask_all)]
            metrics["seq_entropy"] = float(torch.cat(seq_nll).mean())
        return metrics

    # ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def mismatch_metrics(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, seq_log_ratio: torch.Tensor) -> dict[str, float]:
    """Trainer-vs-engine mismatch on response tokens.

    ``kl`` estimates KL(pi_inf || pi) per token with the non-negative k3 estimator
    ``E_{pi_inf}[(rho - 1) - log rho]``, ``rho = pi / pi_inf``, on tokens sampled from pi_inf.
    """
    m = mask.bool()
    d = (logp - ref)[m]
    if d.numel() == 0:
        return {"kl": 0.0, "logprob_absdiff_mean": 0.0, "logprob_absdiff_max": 0.0,
                "log_ratio_mean": 0.0, "log_ratio_std": 0.0, "log_ratio_absmax": 0.0}
    rho = torch.exp(d.clamp(max=50))
    return {
        "kl": float(((rho - 1) - d).mean()),
        "logprob_absdiff_mean": float(d.abs().mean()),
        "logprob_absdiff_max": float(d.abs().max()),
        "log_ratio_mean": float(seq_log_ratio.mean()),
        "log_ratio_std": float(seq_log_ratio.std(unbiased=False)),
        "log_ratio_absmax": float(seq_log_ratio.abs().max()),
    }
