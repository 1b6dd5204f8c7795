"""Caption search shared by every decoder kind: greedy, beam search and sampling, batched, KV-cached.

A decoder kind supplies a Stepper, three small functions over its own state (the KV cache, an
attention mask, positions):

    start(cond)         -> (logits (n, V), state)   run the conditioning once (prefix, prompt, image)
    step(tokens, state) -> logits (n, V)            feed one new token per row
    select(state, rows) -> state                    keep, reorder or repeat rows (beams, finished rows)

and this module decides which tokens to feed. There is one loop per strategy and none in a
decoder, so DeCap's decoder, ClipCap, SmallCap and a prompted LM all search alike.

Scores are the model's log-probabilities (at temperature 1, with banned tokens removed), summed
over the caption and divided by its length ** length_alpha: 1 ranks by the mean per token, as
DeCap and ClipCap do; 0 by the sum, as SmallCap does (HF's length_penalty). The length counts
the stop token when one was generated.

Beam search is transformers' algorithm (`generate(num_beams=k, early_stopping=True)`, tested to
give the same captions): each step keeps the best k unfinished continuations, and a
continuation that ends with a stop token among the best k joins a pool of finished captions;
an input is done when its pool holds k. At the length cap every live beam counts as finished.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ragcap.errors import OptionError


class Stepper(Protocol):
    def start(self, cond: Any) -> tuple[torch.Tensor, Any]: ...

    def step(self, tokens: torch.Tensor, state: Any) -> torch.Tensor: ...

    def select(self, state: Any, rows: torch.Tensor) -> Any: ...


@dataclass(frozen=True)
class SearchOptions:
    # None = the decoder kind's default (Decoder.search_defaults): DeCap decodes greedily with
    # its trained length, SmallCap with 3 beams, 25 tokens and summed log-probs.
    beam: int | None = None  # 1: greedy (or sampling); k > 1: beam search with k beams
    max_tokens: int | None = None  # new tokens at most, the stop token included
    length_alpha: float | None = None  # score = sum of log-probs / length ** alpha (module docstring)
    num_return: int = 1  # captions per input: the n best beams, or n independent samples
    sample: bool = False  # draw each token instead of taking the best
    temperature: float = 1.0  # sampling only: < 1 sharpens, > 1 flattens the distribution
    top_k: int = 0  # sampling only: draw from the k likeliest tokens (0 = all)
    top_p: float = 1.0  # sampling only: draw from the smallest set holding this much probability
    seed: int | None = None  # sampling only: same seed, inputs and batch -> same captions
    stop_ids: tuple[int, ...] = ()  # tokens that end a caption (not part of its text); set by the kind
    banned_ids: tuple[int, ...] = ()  # tokens never generated (e.g. a start-of-text id); set by the kind

    def __post_init__(self):
        beam = 1 if self.beam is None else self.beam
        checks = [
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (beam >= 1, f"beam must be >= 1, got {self.beam}"),
            (self.num_return >= 1, f"the number of captions must be >= 1, got {self.num_return}"),
            (not (self.sample and beam > 1), "sampling and beam search exclude each other: use a beam of 1 to sample"),
            # Below 1e-6 the scaled log-probabilities overflow float32 (NaN draws); it is greedy by then anyway.
            (math.isfinite(self.temperature) and self.temperature >= 1e-6,
             f"temperature must be a finite number of at least 1e-6, got {self.temperature}"),
            (self.seed is None or 0 <= self.seed < 2**63, f"seed must be in [0, 2^63), got {self.seed}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
        ]
        for ok, message in checks:
            if not ok:
                raise OptionError(message)

    def with_defaults(self, beam: int, max_tokens: int, length_alpha: float, **kind: tuple[int, ...]) -> "SearchOptions":
        """These options with the kind's defaults for what they leave None, and its stop/banned ids.

        With n captions wanted from a beam narrower than n, the beam widens to n (n-best needs n beams).
        """
        if self.sample:
            beam = 1
        elif self.beam is not None:
            if self.num_return > self.beam:
                raise OptionError(f"{self.num_return} captions per input need a beam of at least {self.num_return}, or sampling")
            beam = self.beam
        else:
            beam = max(beam, self.num_return)
        return replace(
            self,
            beam=beam,
            max_tokens=max_tokens if self.max_tokens is None else self.max_tokens,
            length_alpha=length_alpha if self.length_alpha is None else self.length_alpha,
            **kind,
        )


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # the caption's tokens, without the stop token
    score: float  # see the module docstring


@torch.inference_mode()
def search(stepper: Stepper, cond: Any, options: SearchOptions) -> list[list[Hypothesis]]:
    """num_return hypotheses per input, best first (samples in the order drawn)."""
    if None in (options.beam, options.max_tokens, options.length_alpha):
        raise OptionError("search needs beam, max_tokens and length_alpha; decoders fill them in (SearchOptions.with_defaults)")
    logits, state = stepper.start(cond)
    if options.beam > 1:
        return _beam(stepper, logits, state, options)
    if options.num_return > 1:  # independent samples: each input's row repeated n times
        rows = torch.arange(logits.shape[0], device=logits.device).repeat_interleave(options.num_return)
        logits, state = logits[rows], stepper.select(state, rows)
    found = _greedy_or_sample(stepper, logits, state, options)
    n = options.num_return
    return [found[i : i + n] for i in range(0, len(found), n)]


def _log_probs(logits: torch.Tensor, options: SearchOptions) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    if options.banned_ids:
        logp[:, list(options.banned_ids)] = -math.inf
    return logp


def _sample(logp: torch.Tensor, options: SearchOptions, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row drawn from the tempered, top-k / top-p truncated distribution."""
    scores = logp / options.temperature
    if options.top_k and options.top_k < scores.shape[-1]:
        kth = scores.topk(options.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if options.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already hold top_p; the likeliest always stays.
        drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= options.top_p
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _greedy_or_sample(stepper: Stepper, logits: torch.Tensor, state: Any, options: SearchOptions) -> list[Hypothesis]:
    n, device = logits.shape[0], logits.device
    stop = torch.tensor(options.stop_ids, dtype=torch.long, device=device)
    generator = None
    if options.sample and options.seed is not None:
        generator = torch.Generator(device=device).manual_seed(options.seed)
    tokens = torch.zeros((n, options.max_tokens), dtype=torch.long, device=device)
    sums = torch.zeros(n, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    rows = torch.arange(n, device=device)  # the original rows still generating
    for t in range(options.max_tokens):
        logp = _log_probs(logits, options)
        chosen = _sample(logp, options, generator) if options.sample else logp.argmax(dim=-1)
        tokens[rows, t] = chosen
        sums[rows] += logp.gather(1, chosen.unsqueeze(1)).squeeze(1)
        lengths[rows] += 1
        ended = torch.isin(chosen, stop)
        stopped[rows] = ended
        if t == options.max_tokens - 1 or bool(ended.all()):
            break
        if bool(ended.any()):  # finished rows leave the batch: no compute is spent on them
            keep = (~ended).nonzero().squeeze(1)
            rows, chosen, state = rows[keep], chosen[keep], stepper.select(state, keep)
        logits = stepper.step(chosen, state)
    scores = sums / lengths.clamp(min=1).float() ** options.length_alpha
    kept = lengths - stopped.long()  # the stop token is not part of the caption
    return [Hypothesis(row[:k], s) for row, k, s in zip(tokens.tolist(), kept.tolist(), scores.tolist())]


def _beam(stepper: Stepper, logits: torch.Tensor, state: Any, options: SearchOptions) -> list[list[Hypothesis]]:
    b, k, device = logits.shape[0], options.beam, logits.device
    vocab = logits.shape[-1]
    stop = torch.tensor(options.stop_ids, dtype=torch.long, device=device)
    # The conditioning ran once per input; each input's k beams start as copies of it.
    rows = torch.arange(b, device=device).repeat_interleave(k)
    logits, state = logits[rows], stepper.select(state, rows)
    live_sums = torch.zeros(b, k, device=device)
    live_sums[:, 1:] = -math.inf  # the copies are identical: only the first may expand at first
    live_tokens = torch.zeros((b, k, 0), dtype=torch.long, device=device)
    pool_scores = torch.full((b, k), -math.inf, device=device)
    pool_tokens = torch.zeros((b, k, options.max_tokens), dtype=torch.long, device=device)
    pool_lengths = torch.zeros((b, k), dtype=torch.long, device=device)
    pool_stopped = torch.zeros((b, k), dtype=torch.bool, device=device)
    full = torch.zeros(b, dtype=torch.bool, device=device)  # inputs whose pool holds k captions
    # Keep enough candidates that k unfinished ones remain even if every stop token is among them.
    n_keep = min(max(2, 1 + len(options.stop_ids)) * k, k * vocab)
    first_k = torch.arange(n_keep, device=device) < k
    batch = torch.arange(b, device=device).unsqueeze(1)
    for t in range(options.max_tokens):
        last = t == options.max_tokens - 1
        scores = live_sums.unsqueeze(-1) + _log_probs(logits, options).view(b, k, vocab)
        top_sums, top_index = scores.view(b, k * vocab).topk(n_keep, dim=-1)
        source, token = top_index // vocab, top_index % vocab
        ends = torch.isin(token, stop)
        candidates = torch.cat([live_tokens[batch, source], token.unsqueeze(-1)], dim=-1)  # (b, n_keep, t + 1)

        # Finished: a stop token, or any candidate at the length cap, ranked among the best k.
        finishing = (ends | last) & first_k & ~full.unsqueeze(1) & (top_sums > -math.inf)
        finished_scores = torch.where(finishing, top_sums / (t + 1) ** options.length_alpha, -math.inf)
        padded = F.pad(candidates, (0, options.max_tokens - t - 1))
        merged_scores, pick = torch.cat([pool_scores, finished_scores], dim=1).topk(k, dim=-1)
        pool_tokens = torch.cat([pool_tokens, padded], dim=1)[batch, pick]
        pool_lengths = torch.cat([pool_lengths, torch.full_like(token, t + 1)], dim=1)[batch, pick]
        pool_stopped = torch.cat([pool_stopped, ends], dim=1)[batch, pick]
        pool_scores = merged_scores
        full = (pool_scores > -math.inf).all(dim=1)
        if last or bool(full.all()):
            break

        # Live: the best k continuations that did not stop.
        live_sums, keep = torch.where(ends, -math.inf, top_sums).topk(k, dim=-1)
        live_tokens = candidates[batch, keep]
        parents = (batch * k + source.gather(1, keep)).view(-1)
        state = stepper.select(state, parents)
        logits = stepper.step(token.gather(1, keep).view(-1), state)
    return [
        [
            Hypothesis(pool_tokens[i, j, : pool_lengths[i, j] - int(pool_stopped[i, j])].tolist(), float(pool_scores[i, j]))
            for j in range(options.num_return)
        ]
        for i in range(b)
    ]
