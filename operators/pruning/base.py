"""The pruning interface shared by every method.

A pruner is a PruneHook (operators/models/decoder.py): it names the decoder layers before which it
acts (0 = on the merged embeddings, before the LLM) and returns, per sample, the indices to keep.
Text and special tokens are never candidates; only audio and video tokens compete, in one joint pool.
"""

from __future__ import annotations

import torch

from operators.models.decoder import AUDIO, VIDEO, PruneContext
from operators.pruning.budget import WindowBudget


class Pruner:
    name = "base"
    pre_llm = True  # keeps its tokens once, on the merged embeddings (False: between decoder layers)

    def __init__(self, budget):
        self.budget = budget

    def layers(self, num_layers: int) -> list[int]:
        raise NotImplementedError

    @classmethod
    def paper_retention(cls, num_layers: int) -> float:
        """Retention used when --retention is not given (methods override with their paper's setting)."""
        return 0.5

    def select(self, ctx: PruneContext) -> list[torch.Tensor] | None:
        raise NotImplementedError

    def compute_share(self, plan: WindowBudget, n_video: int, n_audio: int, num_layers: int) -> float:
        """The share of the window's audio+video token-layers the LLM prefill processes under `plan`: what
        `retention` budgets and the rows report (kept counts averaged over layers). The adaptive budget
        calibrates on it. A pre-LLM method keeps the plan's joint keep in every layer."""
        n = n_video + n_audio
        if n == 0 or not plan.prunes(n_video, n_audio):
            return 1.0
        return plan.joint_keep(n_video, n_audio) / n

    # ---- shared helpers ---------------------------------------------------------------------
    def plans(self, ctx: PruneContext) -> list[WindowBudget]:
        """One WindowBudget per sample, computed once per batch from the content signals."""
        if "plans" not in ctx.extras:
            ctx.extras["plans"] = [self.budget.plan(video, audio) for video, audio in ctx.extras["signals"]]
        return ctx.extras["plans"]


def av_counts(ctx: PruneContext, b: int) -> tuple[int, int]:
    state = ctx.state
    return (int(((state.modality[b] == VIDEO) & state.valid[b]).sum()),
            int(((state.modality[b] == AUDIO) & state.valid[b]).sum()))


def audio_reserve(audio_min: int, keep: int) -> int:
    """Audio tokens kept ahead of the ranking: the budget's floor, but never more than half the window's
    keep, so a tight budget on a silent clip still leaves the picture its share."""
    return min(audio_min, keep // 2)


def select_joint(ctx: PruneContext, b: int, scores: torch.Tensor, keep: int, plan=None) -> torch.Tensor:
    """Indices to keep for sample b: all text tokens plus the `keep` best-scored audio/video tokens.

    One ranking over the joint pool; with a plan (WindowBudget), its per-modality caps skip a modality
    once it is full, and its best `audio_min` audio tokens go first.
    """
    state = ctx.state
    modality = state.modality[b]
    text, candidates = state.text_indices(b), state.media_indices(b)
    if keep >= candidates.numel() and plan is None:
        return torch.cat([text, candidates])
    order = candidates[torch.argsort(scores[candidates].float(), descending=True, stable=True)]
    if plan is None:
        return torch.cat([text, order[:keep]])
    allowed = torch.ones(order.numel(), dtype=torch.bool, device=order.device)
    for code, cap in ((VIDEO, plan.video_cap), (AUDIO, plan.audio_cap)):
        is_mod = modality[order] == code
        rank = torch.cumsum(is_mod.long(), 0) - 1  # rank within the modality, best first
        allowed &= ~is_mod | (rank < cap)
    order = order[allowed]
    reserved = audio_reserve(plan.audio_min, keep)
    if reserved > 0:
        is_audio = modality[order] == AUDIO
        first = is_audio & (torch.cumsum(is_audio.long(), 0) <= reserved)
        order = torch.cat([order[first], order[~first]])
    return torch.cat([text, order[:keep]])


def keep_all(ctx: PruneContext, b: int) -> torch.Tensor:
    return torch.nonzero(ctx.state.valid[b]).flatten()


def modality_split(plan, n_video: int, n_audio: int) -> tuple[int, int]:
    """The joint budget split in proportion to each modality's (capped) token count."""
    total = plan.joint_keep(n_video, n_audio)
    pool_v, pool_a = min(n_video, plan.video_cap), min(n_audio, plan.audio_cap)
    reserved_audio = min(audio_reserve(plan.audio_min, total), pool_a)
    k_video = min(round(total * pool_v / max(pool_v + pool_a, 1)), pool_v, total - reserved_audio)
    return k_video, min(total - k_video, pool_a)


def time_order(state, b: int, idx: torch.Tensor) -> torch.Tensor:
    """idx sorted by (temporal, height, width) RoPE ids: a modality's stream in time order."""
    t, h, w = state.position_ids[:, b, idx].long()
    span = int(max(h.max(), w.max())) + 1
    return idx[torch.argsort((t * span + h) * span + w, stable=True)]


def select_stratified(ctx: PruneContext, b: int, scores: torch.Tensor, k_video: int, k_audio: int) -> torch.Tensor:
    """All text tokens plus, per modality, the best-scored token of each of k equal consecutive strata of
    its stream in time order. A top-k of per-token scores spends the budget on a few seconds (25
    near-identical tokens of a tone score alike) and drops whole events; strata keep uniform's coverage
    of the clip and let the scores choose which token stands for each stretch."""
    state = ctx.state
    chosen = [state.text_indices(b)]
    for code, k in ((VIDEO, k_video), (AUDIO, k_audio)):
        idx = torch.nonzero(state.valid[b] & (state.modality[b] == code)).flatten()
        if k <= 0 or idx.numel() == 0:
            continue
        order = time_order(state, b, idx)
        k = min(k, order.numel())
        # Stratum ids as torch.tensor_split would cut them (the first n % k strata one token longer), then
        # each stratum's best token in one pass: best-first, stably regrouped by stratum, first of each.
        sizes = torch.full((k,), order.numel() // k, device=order.device)
        sizes[: order.numel() % k] += 1
        stratum = torch.repeat_interleave(torch.arange(k, device=order.device), sizes)
        best_first = torch.argsort(scores[order].float(), descending=True, stable=True)
        grouped = best_first[torch.argsort(stratum[best_first], stable=True)]
        chosen.append(order[grouped[torch.cumsum(sizes, 0) - sizes]])
    return torch.cat(chosen)


def joint_split(ctx: PruneContext, b: int, scores: torch.Tensor, plan, floor: float) -> tuple[int, int]:
    """(k_video, k_audio) as one top-k over the joint pool chooses them, each modality held to at least
    `floor` of its proportional share (modality_split). Unbounded, the joint top-k of a frozen model's
    sieve gave 38% of clips under 20% or over 80% audio at retention 0.1, and their captions lost events."""
    modality, counts = ctx.state.modality[b], av_counts(ctx, b)
    kept = select_joint(ctx, b, scores, plan.joint_keep(*counts), plan)
    k_video, k_audio = int((modality[kept] == VIDEO).sum()), int((modality[kept] == AUDIO).sum())
    share_video, share_audio = modality_split(plan, *counts)
    total = k_video + k_audio
    k_video = min(max(k_video, int(floor * share_video)), total - int(floor * share_audio))
    return k_video, total - k_video
