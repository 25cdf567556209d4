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
