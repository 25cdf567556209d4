"""Baselines that prune on the merged embeddings, before the LLM: random and uniform."""

from __future__ import annotations

import torch

from operators.models.decoder import AUDIO, VIDEO, PruneContext
from operators.pruning.base import Pruner, av_counts, keep_all, modality_split, select_joint, time_order


class RandomPruner(Pruner):
    """Keeps a random subset of the joint audio+video pool (seeded per window, so reruns agree)."""

    name = "random"

    def layers(self, num_layers: int) -> list[int]:
        return [0]

    def select(self, ctx: PruneContext) -> list[torch.Tensor]:
        keep = []
        for b, plan in enumerate(self.plans(ctx)):
            n_video, n_audio = av_counts(ctx, b)
            if not plan.prunes(n_video, n_audio):  # as every method asks: a binding cap prunes at 1.0 too
                keep.append(keep_all(ctx, b))
                continue
            # Draw over the sample's own prompt positions so batching cannot change the draw.
            gen = torch.Generator().manual_seed(int(ctx.extras["seeds"][b]))
            source = ctx.state.source_index[b]
            draw = torch.rand(int(source.max()) + 1, generator=gen).to(source.device)
            scores = draw[source.clamp(min=0)]
            keep.append(select_joint(ctx, b, scores, plan.joint_keep(n_video, n_audio), plan))
        return keep


class UniformPruner(Pruner):
    """Even temporal stride within each modality; the joint budget is split in proportion to each
    modality's (capped) token count, since uniform has no scores to arbitrate between them."""

    name = "uniform"

    def layers(self, num_layers: int) -> list[int]:
        return [0]

    def select(self, ctx: PruneContext) -> list[torch.Tensor]:
        state = ctx.state
        keep = []
        for b, plan in enumerate(self.plans(ctx)):
            n_video, n_audio = av_counts(ctx, b)
            if not plan.prunes(n_video, n_audio):
                keep.append(keep_all(ctx, b))
                continue
            k_video, k_audio = modality_split(plan, n_video, n_audio)
            scores = torch.zeros(state.valid.shape[1], device=state.valid.device)
            for code, k in ((VIDEO, k_video), (AUDIO, k_audio)):
                idx = torch.nonzero(state.valid[b] & (state.modality[b] == code)).flatten()
                if k <= 0 or idx.numel() == 0:
                    continue
                order = time_order(state, b, idx)  # so the stride is temporal
                picks = torch.linspace(0, order.numel() - 1, k).round().long()
                scores[order[picks]] = 1.0
            keep.append(select_joint(ctx, b, scores, k_video + k_audio))
        return keep
