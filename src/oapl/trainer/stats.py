"""Train-step metrics as mergeable partial sums.

Every micro-batch adds its sums to a :class:`StepStats`; ranks (and mini-batches) add theirs with
:meth:`StepStats.merge`; :func:`metrics_row` turns the merged sums and the batch-level numbers into
the metric row of one trainer step. One process and N ranks therefore report the same numbers by
construction (up to summation order).

Mismatch metrics are on response tokens, trainer (pi) vs engine (pi_inf):

* ``kl``: KL(pi_inf || pi) per token by the non-negative k3 estimator ``E[(rho - 1) - log rho]``,
  ``rho = pi / pi_inf``, on tokens sampled from pi_inf;
* ``logprob_absdiff_mean``/``_max``: ``|log pi - log pi_inf|``;
* ``log_ratio_*``: the sequence log-ratio ``s_i = sum_t (log pi - log pi_inf)`` of the OAPL loss;
* ``entropy``: per-token entropy of the trainer's distribution; ``seq_entropy``: the Monte-Carlo
  sequence entropy of pi_inf, ``E_{y ~ pi_inf}[-log pi_inf(y)]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from oapl.objectives import sequence_log_ratio


@dataclass
class StepStats:
    loss: float = 0.0
    seqs: int = 0
    tokens: int = 0  # response tokens
    kl: float = 0.0
    absdiff: float = 0.0
    absdiff_max: float = 0.0
    s_sum: float = 0.0
    s_sq: float = 0.0
    s_absmax: float = 0.0
    ent: float = 0.0
    seq_nll: float = 0.0
    useful_tokens: int = 0  # prompt + response tokens the decoder ran on
    computed_tokens: int = 0  # the same plus padding
    micro_batches: int = 0
    objective: dict[str, float] = field(default_factory=dict)  # the objective's *_sum / tokens / *_max

    @torch.no_grad()
    def add(
        self,
        loss: torch.Tensor,
        logp: torch.Tensor,
        ref: torch.Tensor,
        mask: torch.Tensor,
        ent: torch.Tensor | None,
        objective_stats: dict[str, torch.Tensor],
        useful_tokens: int,
        computed_tokens: int,
    ) -> None:
        self.loss += float(loss.detach())
        self.micro_batches += 1
        self.useful_tokens += int(useful_tokens)
        self.computed_tokens += int(computed_tokens)
        for k, t in objective_stats.items():
            v = float(t)
            self.objective[k] = (
                max(self.objective.get(k, v), v) if k.endswith("_max") else self.objective.get(k, 0.0) + v
            )
        logp, ref, mask = logp.detach().float().cpu(), ref.detach().float().cpu(), mask.float().cpu()
        d = (logp - ref)[mask.bool()].double()
        if d.numel():
            rho = torch.exp(d.clamp(max=50))
            self.tokens += d.numel()
            self.kl += float(((rho - 1) - d).sum())
            self.absdiff += float(d.abs().sum())
            self.absdiff_max = max(self.absdiff_max, float(d.abs().max()))
        s = sequence_log_ratio(logp, ref, mask).double()
        self.seqs += s.numel()
        self.s_sum += float(s.sum())
        self.s_sq += float((s * s).sum())
        if s.numel():
            self.s_absmax = max(self.s_absmax, float(s.abs().max()))
        if ent is not None:
            self.ent += float((ent.detach().float().cpu() * mask).sum())
        self.seq_nll += float((-(ref * mask).sum(-1)).sum())

    def merge(self, other: StepStats | dict[str, Any]) -> StepStats:
        o = other if isinstance(other, StepStats) else StepStats(**other)
        for k in (
            "loss",
            "seqs",
            "tokens",
            "kl",
            "absdiff",
            "s_sum",
            "s_sq",
            "ent",
            "seq_nll",
            "useful_tokens",
            "computed_tokens",
            "micro_batches",
        ):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        for k in ("absdiff_max", "s_absmax"):
            setattr(self, k, max(getattr(self, k), getattr(o, k)))
        for k, v in o.objective.items():
            self.objective[k] = (
                max(self.objective.get(k, v), v) if k.endswith("_max") else self.objective.get(k, 0.0) + v
            )
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_metrics(groups, objective, adv: torch.Tensor, values: torch.Tensor) -> dict[str, float]:
    """The batch-level numbers of a step (rewards, baseline, advantages, lengths)."""
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float64)
    lengths = torch.tensor([len(t) for g in groups for t in g.response_token_ids], dtype=torch.float64)
    n = len(rewards)
    return {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
        objective.value_key: float(values.mean()),
        "adv_mean": float(adv.mean()),
        "adv_std": float(adv.std(unbiased=False)),
        "response_len_mean": float(lengths.mean()),
        "truncated_frac": sum(f == "length" for g in groups for f in g.finish_reasons) / max(1, n),
    }


def metrics_row(
    batch: dict[str, float],
    stats: StepStats,
    *,
    finite: bool,
    grad_norm: float,
    lr: float,
    seconds: float,
    mini_batches: int = 1,
) -> dict[str, float]:
    """One trainer step's metrics from the batch numbers and the merged partial sums."""
    vkey = next(k for k in ("v_star_mean", "baseline_mean") if k in batch)
    row: dict[str, float] = {
        "loss": stats.loss / mini_batches if finite else float("nan"),
        "skipped": 0.0 if finite else 1.0,
        "reward_mean": batch["reward_mean"],
        "reward_std": batch["reward_std"],
        vkey: batch[vkey],
        "adv_mean": batch["adv_mean"],
        "adv_std": batch["adv_std"],
        "grad_norm": grad_norm,
        "lr": lr,
        "response_len_mean": batch["response_len_mean"],
        "truncated_frac": batch["truncated_frac"],
        "train_seconds": seconds,
        "train_tokens_per_s": stats.useful_tokens / max(seconds, 1e-9),
        "padding_frac": 1.0 - stats.useful_tokens / max(stats.computed_tokens, 1),
    }
    ob = stats.objective
    if "tokens" in ob:  # GRPO: token means over the batch
        t = max(ob["tokens"], 1.0)
        row["clip_frac"] = ob.get("clip_frac_sum", 0.0) / t
        row["is_weight_mean"] = ob.get("is_weight_sum", 0.0) / t
        row["ratio_mean"] = ob.get("ratio_sum", 0.0) / t
        row["ratio_max"] = ob.get("ratio_max", 0.0)
        from oapl.objectives.grpo import is_weight_quantile

        p1, p99 = is_weight_quantile(ob, 0.01), is_weight_quantile(ob, 0.99)
        if p1 is not None and p99 is not None:  # token quantiles of the truncated IS weight (to ~1%)
            row["is_weight_p1"], row["is_weight_p99"] = p1, p99
    if stats.seqs:
        if stats.tokens == 0:
            row.update(
                {
                    "kl": 0.0,
                    "logprob_absdiff_mean": 0.0,
                    "logprob_absdiff_max": 0.0,
                    "log_ratio_mean": 0.0,
                    "log_ratio_std": 0.0,
                    "log_ratio_absmax": 0.0,
                }
            )
        else:
            mean_s = stats.s_sum / stats.seqs
            row.update(
                {
                    "kl": stats.kl / stats.tokens,
                    "logprob_absdiff_mean": stats.absdiff / stats.tokens,
                    "logprob_absdiff_max": stats.absdiff_max,
                    "log_ratio_mean": mean_s,
                    "log_ratio_std": math.sqrt(max(stats.s_sq / stats.seqs - mean_s * mean_s, 0.0)),
                    "log_ratio_absmax": stats.s_absmax,
                }
            )
        row["entropy"] = stats.ent / max(stats.tokens, 1)
        row["seq_entropy"] = stats.seq_nll / stats.seqs
    return row
