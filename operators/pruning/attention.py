"""Training-free pruning inside the decoder from last-query attention: FastV and FastAV.

Scores are the head-averaged attention of the last prompt token over the cached keys of the previous
layer, computed as a single query row (PrunableDecoder.last_query_attention), so SDPA/FlashAttention
keep working and no full attention matrix is ever built.

Both methods honour the compute-budget meaning of `retention` (see budget.py): the number of audio +
video tokens they keep after their pruning layer is solved so that the average over all layers equals
the window's retention. Where that is impossible (a budget below what pruning at the chosen layer can
reach), they keep a small floor and the recorded kept counts show the real compute.
"""

from __future__ import annotations

import math

import torch

from operators.models.decoder import PruneContext
from operators.pruning.base import Pruner, av_counts, keep_all, select_joint

FLOOR_FRACTION = 0.02  # never keep fewer than this share of the audio+video pool at a stage


def single_stage_fraction(retention: float, num_layers: int, layer: int) -> float:
    """Kept share after pruning before `layer` so that mean token-layers = retention."""
    if retention >= 1.0:
        return 1.0
    return min(1.0, max(FLOOR_FRACTION, (retention * num_layers - layer) / (num_layers - layer)))


class FastVPruner(Pruner):
    """FastV: one cut before layer K by the last query's attention at layer K-1 (K=2 for 28 layers)."""

    name = "fastv"
    pre_llm = False

    def __init__(self, budget, layer: int | None = None):
        super().__init__(budget)
        self.layer = layer

    def prune_layer(self, num_layers: int) -> int:
        return self.layer if self.layer is not None else max(1, round(2 * num_layers / 28))

    def layers(self, num_layers: int) -> list[int]:
        return [self.prune_layer(num_layers)]

    @classmethod
    def paper_retention(cls, num_layers: int) -> float:
        """FastV's published setting: K=2 (of 28-32 layers), drop 50% of the visual tokens."""
        k = max(1, round(2 * num_layers / 28))
        return (k + 0.5 * (num_layers - k)) / num_layers

    def compute_share(self, plan, n_video: int, n_audio: int, num_layers: int) -> float:
        """Every token through the layers before K, then the plan's keep at the single-stage fraction."""
        n = n_video + n_audio
        if n == 0 or not plan.prunes(n_video, n_audio):
            return 1.0
        k = self.prune_layer(num_layers)
        kept = plan.joint_keep(n_video, n_audio, single_stage_fraction(plan.retention, num_layers, k))
        return (k * n + (num_layers - k) * kept) / (num_layers * n)

    def select(self, ctx: PruneContext) -> list[torch.Tensor]:
        scores = ctx.last_query_scores()
        keep = []
        for b, plan in enumerate(self.plans(ctx)):
            n_video, n_audio = av_counts(ctx, b)
            fraction = single_stage_fraction(plan.retention, ctx.num_layers, ctx.layer)
            if not plan.prunes(n_video, n_audio):
                keep.append(keep_all(ctx, b))
                continue
            keep.append(select_joint(ctx, b, scores[b], plan.joint_keep(n_video, n_audio, fraction), plan))
        return keep


def fastav_schedule(retention: float, num_layers: int, start_layer: int, drop: float = 0.2):
    """(global layer K, global keep share g, per-layer drop P) with mean token-layers = retention.

    Layers < K see every token, layer K keeps g of the pool, each later layer keeps (1 - P) of the
    previous one. Mean share = (K + g * S) / L with S = sum_{j < L-K} (1-P)^j. If the budget is too
    small for K, the global layer moves earlier; if it is large (g would exceed 1), P is reduced.
    """
    if retention >= 1.0:
        return None
    L = num_layers
    for K in range(start_layer, 0, -1):
        series = sum((1 - drop) ** j for j in range(L - K))
        g = (retention * L - K) / series
        if g > 1.0:
            need = retention * L - K  # solve sum_{j} (1-P)^j = need for P in [0, drop]
            lo, hi = 0.0, drop
            for _ in range(50):
                mid = (lo + hi) / 2
                if sum((1 - mid) ** j for j in range(L - K)) > need:
                    lo = mid
                else:
                    hi = mid
            return K, 1.0, (lo + hi) / 2
        if g >= FLOOR_FRACTION:
            return K, g, drop
    return 1, FLOOR_FRACTION, drop


class FastAVPruner(Pruner):
    """FastAV: global pruning at the middle layer, then drop P=20% of the remaining audio/video tokens
    before every later layer by last-query attention.

    The paper selects the global stage's tokens from an attention-rollout analysis that showed
    influence concentrating on earlier tokens; its exact online rule is not public. Two readings:
    - "attention" (default): the last query's attention averaged over all layers before K, a cheap
      rollout proxy that needs one score row per layer;
    - "position": keep the earliest audio/video tokens (the offline rollout finding taken literally).
    """

    name = "fastav"
    pre_llm = False

    def __init__(self, budget, global_layer: int | None = None, drop: float = 0.2, global_scores: str = "attention"):
        super().__init__(budget)
        if global_scores not in ("attention", "position"):
            raise ValueError("global_scores must be 'attention' or 'position'")
        self.global_layer, self.drop, self.global_scores = global_layer, drop, global_scores

    def layers(self, num_layers: int) -> list[int]:
        return list(range(1, num_layers))

    @classmethod
    def paper_retention(cls, num_layers: int) -> float:
        """The paper's setting: global pruning at L/2 keeping about a third, then P=20% per layer
        (56% of full prefill FLOPs for 28 layers)."""
        k = num_layers // 2
        return (k + (1 / 3) * sum(0.8 ** j for j in range(num_layers - k))) / num_layers

    def schedule(self, plan, n_video: int, n_audio: int, num_layers: int):
        """(K, g, P) for a window (fastav_schedule), or None when it keeps every token."""
        start = max(1, self.global_layer if self.global_layer is not None else num_layers // 2)
        sched = fastav_schedule(plan.retention, num_layers, start, self.drop)
        if sched is None and plan.prunes(n_video, n_audio):
            sched = (start, 1.0, 0.0)  # full budget, but a binding cap (silent audio)
        return sched

    def compute_share(self, plan, n_video: int, n_audio: int, num_layers: int) -> float:
        """The counts select() keeps, layer by layer: all before K, the global keep at K, then (1 - P) of
        the previous layer's count (rounded up) before each later layer."""
        n = n_video + n_audio
        sched = self.schedule(plan, n_video, n_audio, num_layers) if n else None
        if sched is None:
            return 1.0
        k, g, drop = sched
        count, total = plan.joint_keep(n_video, n_audio, g), k * n
        for _ in range(k, num_layers):
            total += count
            count = min(count, math.ceil((1 - drop) * count))
        return total / (num_layers * n)

    def _schedules(self, ctx: PruneContext):
        if "fastav" not in ctx.extras:
            ctx.extras["fastav"] = [self.schedule(plan, *av_counts(ctx, b), ctx.num_layers)
                                    for b, plan in enumerate(self.plans(ctx))]
            ctx.extras["fastav_acc"] = torch.zeros(ctx.state.valid.shape, device=ctx.state.valid.device)
        return ctx.extras["fastav"]

    def select(self, ctx: PruneContext) -> list[torch.Tensor] | None:
        schedules = self._schedules(ctx)
        if all(s is None for s in schedules):
            return None
        state = ctx.state
        scores = ctx.last_query_scores()
        # Accumulate per original token index so re-packing by other samples cannot misalign it.
        acc = ctx.extras["fastav_acc"]
        src = state.source_index.clamp(min=0)
        acc.scatter_add_(1, src, scores.masked_fill(~state.valid, 0.0))
        keep, changed = [], False
        for b, (plan, sched) in enumerate(zip(self.plans(ctx), schedules)):
            if sched is None or ctx.layer < sched[0]:
                keep.append(keep_all(ctx, b))
                continue
            n_video, n_audio = av_counts(ctx, b)
            K, g, drop = sched
            if ctx.layer == K:
                if self.global_scores == "position":
                    score = -state.source_index[b].float()
                else:
                    score = torch.gather(acc[b], 0, src[b]) / K
                count = plan.joint_keep(n_video, n_audio, g)  # nothing pruned yet: the full pool
            else:
                score = scores[b]
                count = math.ceil((1 - drop) * (n_video + n_audio))
            keep.append(select_joint(ctx, b, score, count, plan))
            changed = True
        return keep if changed else None
