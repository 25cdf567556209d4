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


def select_joint(ctx: PruneContext, b: int, scores: torch.Tensor, keep: int, video_cap: int | None = None,
                 audio_cap: int | None = None) -> torch.Tensor:
    """Indices to keep for sample b: all text tokens plus the `keep` best-scored audio/video tokens.

    One ranking over the joint pool; optional per-modality caps skip a modality once it is full.
    """
    state = ctx.state
    modality = state.modality[b]
    text, candidates = state.text_indices(b), state.media_indices(b)
    if keep >= candidates.numel() and video_cap is None and audio_cap is None:
        return torch.cat([text, candidates])
    order = candidates[torch.argsort(scores[candidates].float(), descending=True, stable=True)]
    if video_cap is not None or audio_cap is not None:
        allowed = torch.ones(order.numel(), dtype=torch.bool, device=order.device)
        for code, cap in ((VIDEO, video_cap), (AUDIO, audio_cap)):
            if cap is None:
                continue
            is_mod = modality[order] == code
            rank = torch.cumsum(is_mod.long(), 0) - 1  # rank within the modality, best first
            allowed &= ~is_mod | (rank < cap)
        order = order[allowed]
    return torch.cat([text, order[:keep]])


def keep_all(ctx: PruneContext, b: int) -> torch.Tensor:
    return torch.nonzero(ctx.state.valid[b]).flatten()


def modality_split(plan, n_video: int, n_audio: int) -> tuple[int, int]:
    """The joint budget split in proportion to each modality's (capped) token count."""
    total = plan.joint_keep(n_video, n_audio)
    pool_v, pool_a = min(n_video, plan.video_cap), min(n_audio, plan.audio_cap)
    k_video = min(round(total * pool_v / max(pool_v + pool_a, 1)), pool_v)
    return k_video, min(total - k_video, pool_a)


def select_by_time(ctx: PruneContext, b: int, scores: torch.Tensor, k_video: int, k_audio: int) -> torch.Tensor:
    """All text tokens plus, per modality, the best-scored tokens of every one-second slice, each slice
    budgeted in proportion to its size (largest remainder). A plain top-k can spend the whole budget on
    a few seconds and drop whole events; this keeps every second's share, as uniform does, but lets the
    scores choose which tokens fill it. Time is the temporal RoPE id (position_ids_per_second per s)."""
    state = ctx.state
    per_second = int(ctx.extras.get("position_ids_per_second", 25))
    chosen = [state.text_indices(b)]
    for code, k in ((VIDEO, k_video), (AUDIO, k_audio)):
        idx = torch.nonzero(state.valid[b] & (state.modality[b] == code)).flatten()
        if k <= 0 or idx.numel() == 0:
            continue
        t = state.position_ids[0, b, idx]
        slot = torch.div(t - t.min(), per_second, rounding_mode="floor")
        sizes = torch.bincount(slot).float()
        share = k * sizes / sizes.sum()
        quota = share.floor().long()
        extra = k - int(quota.sum())
        if extra > 0:
            quota[torch.argsort(share - quota, descending=True, stable=True)[:extra]] += 1
        for s in torch.nonzero(quota).flatten().tolist():
            members = idx[slot == s]
            top = torch.topk(scores[members].float(), min(int(quota[s]), members.numel())).indices
            chosen.append(members[top])
    return torch.cat(chosen)
