"""Transformers inference engine: the always-available fallback.

A batched sampling loop with a KV cache over a Hugging Face causal LM. It records, for every sampled
token, its log-probability under the distribution it was actually drawn from (logits / temperature,
then top-p renormalised), which is what OAPL uses as ``log pi_inf``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from oapl.engines.base import Completion, GenerationOutput, SamplingParams, WeightIterator


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the smallest set whose probability mass reaches ``top_p``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    cum = probs.cumsum(dim=-1)
    remove = (cum - probs) >= top_p  # keep tokens until the mass before them reaches top_p
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)


class TransformersEngine:
    """Sample from a Hugging Face causal LM held in this process.

    Args:
        model: a ``transformers`` causal LM (its own copy: the engine's weights lag the trainer's).
        tokenizer: the matching tokenizer (used for stop strings and decoding).
        max_batch_size: sequences decoded together.
        seed: the sampling generator is re-seeded from ``(seed, version)`` at every weight load, so a
            run is reproducible and a resumed run samples what the uninterrupted one would have.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 64, seed: int = 0) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.seed = seed
        self._version = 0
        self.device = next(model.parameters()).device
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(self._seed_for(0))
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._params = dict(model.named_parameters())
        self._buffers = dict(model.named_buffers())

    def _seed_for(self, version: int) -> int:
        return (self.seed * 1_000_003 + version * 7919) % (2**63 - 1)

    @property
    def version(self) -> int:
        return self._version

    @torch.no_grad()
    def load_weights(self, weights: WeightIterator, version: int) -> float:
        start = time.perf_counter()
        unknown = []
        for name, tensor in weights:
            target = self._params.get(name)
            if target is None:
                target = self._buffers.get(name)
            if target is None:
                unknown.append(name)
                continue
            target.data.copy_(tensor.to(device=target.device, dtype=target.dtype))
        if unknown:
            raise KeyError(f"engine model has no parameters named {unknown[:5]} ({len(unknown)} in all)")
        self._version = version
        self._generator.manual_seed(self._seed_for(version))
        return time.perf_counter() - start

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationOutput]:
        flat = [list(p) for p in prompt_token_ids for _ in range(params.n)]
        completions: list[Completion] = []
        start = time.perf_counter()
        for i in range(0, len(flat), self.max_batch_size):
            completions.extend(self._generate_batch(flat[i : i + self.max_batch_size], params))
        elapsed = time.perf_counter() - start
        n_tokens = sum(len(c.token_ids) for c in completions)
        outputs = []
        for j, prompt in enumerate(prompt_token_ids):
            group = completions[j * params.n : (j + 1) * params.n]
            outputs.append(GenerationOutput(list(prompt), group, self._version))
        if outputs:
            outputs[0].stats = {"gen_seconds": elapsed, "gen_tokens": float(n_tokens)}
        return outputs

    @torch.no_grad()  # also when the model is the trainer's (mid-window evaluation); not inference_mode:
    # a tensor a module caches there could not be saved for the trainer's backward later
    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("cannot generate from an empty prompt")
        b = len(prompts)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((b, width), dtype=torch.long)
        for k, p in enumerate(prompts):  # left padding
            input_ids[k, width - len(p) :] = torch.tensor(p)
            attention[k, width - len(p) :] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)

        tokens: list[list[int]] = [[] for _ in range(b)]
        logps: list[list[float]] = [[] for _ in range(b)]
        finish = ["length"] * b
        done = torch.zeros(b, dtype=torch.bool)
        stop_cut: dict[int, int] = {}
        out = self.model(
            input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=True, logits_to_keep=1
        )
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()
        next_pos = position_ids[:, -1:] + 1
        for _step in range(params.max_tokens):
            if params.temperature == 0:
                logp_all = torch.log_softmax(logits, dim=-1)
                nxt = logits.argmax(dim=-1)
            else:
                scaled = _top_p_filter(logits / params.temperature, params.top_p)
                logp_all = torch.log_softmax(scaled, dim=-1)
                nxt = torch.multinomial(logp_all.exp(), 1, generator=self._generator).squeeze(-1)
            chosen = logp_all.gather(-1, nxt.unsqueeze(-1)).squeeze(-1).cpu()
            nxt_cpu = nxt.cpu()
            for k in range(b):
                if done[k]:
                    continue
                tok = int(nxt_cpu[k])
                tokens[k].append(tok)
                logps[k].append(float(chosen[k]))
                if tok in self.eos_token_ids:
                    done[k], finish[k] = True, "stop"
                elif params.stop:
                    tail = self.tokenizer.decode(tokens[k][-16:], skip_special_tokens=True)
                    if any(s in tail for s in params.stop):
                        done[k], finish[k] = True, "stop"
                        stop_cut[k] = len(tokens[k])
            if bool(done.all()):
                break
            feed = torch.where(done.to(nxt.device), torch.full_like(nxt, self.pad_token_id), nxt)
            attention = torch.cat([attention, (~done).long().unsqueeze(-1).to(self.device)], dim=-1)
            out = self.model(
                input_ids=feed.unsqueeze(-1),
                attention_mask=attention,
                position_ids=next_pos,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        results = []
        for k in range(b):
            text = self.tokenizer.decode(tokens[k], skip_special_tokens=True)
            if k in stop_cut:
                cut = min((text.find(s) for s in params.stop if s in text), default=len(text))
                text = text[:cut]
            results.append(Completion(text, tokens[k], logps[k], finish[k]))
        return results

    def close(self) -> None:
        self._params.clear()
        self._buffers.clear()
