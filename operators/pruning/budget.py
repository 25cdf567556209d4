"""Token budgets: how much of each window's joint audio+video pool to keep.

`retention` always means a compute budget: the fraction of audio+video token-layers the LLM prefill
processes (kept tokens summed over decoder layers / (layers x audio+video tokens)). A pre-LLM pruner
meets it by keeping that fraction of tokens; staged in-LLM pruners translate it into their schedules
(operators/pruning/attention.py), so methods compare at equal compute.

- FixedBudget: every window gets `retention`.
- AdaptiveBudget: one joint pool per window, no fixed split between modalities. The window's retention
  scales with its content level (share of novel video tokens and audible audio tokens, see content.py)
  within [lo, hi], around a reference level `c_ref` that is calibrated on a sample of the run so that
  the run's token-weighted mean retention equals the target. Audio is also capped at its audible tokens
  (never below audio_floor: 8% of the stream), so silent audio keeps few audio tokens; a static scene keeps fewer video
  tokens than a busy one through its lower content level. A window of sound alone (no video tokens) has no
  audio cap: the joint pool is its audio, and the cap would only starve it. (Video is not capped: a hard cap at "novel"
  tokens could leave a run unable to reach its target at all.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from operators.pruning.content import content_level

INFORMATIVE = 0.5  # a token with novelty/activity above this counts as informative
# The audio cap never goes below this share of the stream (nor below 2 tokens): the least of a stream
# the embedded model's pruning-aware training shows it (TrainConfig.prune_min_retention). Cut to 2
# tokens, silent audio left the v18 captioner unable to say "there is no sound" (BENCHMARKS.md).
MIN_KEEP_SHARE = 0.08
MIN_KEEP_TOKENS = 2


def audio_floor(n_audio: int) -> int:
    """Fewest audio tokens the adaptive budget keeps of a stream of n_audio, however quiet it is."""
    return min(n_audio, max(MIN_KEEP_TOKENS, math.ceil(MIN_KEEP_SHARE * n_audio)))


@dataclass(frozen=True)
class WindowBudget:
    retention: float  # compute budget for this window
    video_cap: int  # most video tokens any stage may keep
    audio_cap: int
    audio_min: int = 0  # audio tokens every stage keeps first, whatever the scores (adaptive: audio_floor)

    def prunes(self, n_video: int, n_audio: int) -> bool:
        """False when this window keeps every token (retention 1 and no binding cap)."""
        return self.retention < 1.0 or self.video_cap < n_video or self.audio_cap < n_audio

    def joint_keep(self, n_video: int, n_audio: int, fraction: float | None = None) -> int:
        """Tokens to keep from the joint pool at a stage that keeps `fraction` (default: retention)."""
        n = n_video + n_audio
        keep = int(round((self.retention if fraction is None else fraction) * n))
        return max(0, min(keep, self.video_cap + self.audio_cap, n))


class FixedBudget:
    name = "fixed"

    def __init__(self, retention: float):
        self.retention = retention

    def plan(self, video: torch.Tensor, audio: torch.Tensor) -> WindowBudget:
        return WindowBudget(self.retention, video.numel(), audio.numel())


class AdaptiveBudget:
    name = "adaptive"

    def __init__(self, retention: float, c_ref: float | None = None, lo_factor: float = 0.25,
                 hi_factor: float = 2.5):
        self.retention = retention
        self.lo = retention * lo_factor
        self.hi = min(1.0, retention * hi_factor)
        self.c_ref = c_ref if c_ref is not None else 0.5  # replaced by calibrate() in real runs

    def window_retention(self, level: float) -> float:
        if self.retention >= 1.0:
            return 1.0
        return float(min(self.hi, max(self.lo, self.retention * level / max(self.c_ref, 1e-6))))

    def plan(self, video: torch.Tensor, audio: torch.Tensor) -> WindowBudget:
        if self.retention >= 1.0:
            return WindowBudget(1.0, video.numel(), audio.numel())
        floor = audio_floor(audio.numel())
        # The cap moves a quiet window's budget to its picture; sound alone has nowhere to move it, and
        # its lower content level already lowers the window's retention.
        audio_cap = max(floor, int((audio > INFORMATIVE).sum())) if video.numel() else audio.numel()
        return WindowBudget(self.window_retention(content_level(video, audio)), video.numel(), audio_cap, floor)

    def expected_kept(self, signals: list[tuple[torch.Tensor, torch.Tensor]], share=None) -> float:
        """Token-weighted mean compute share this budget gives on `signals` (caps included). `share(plan,
        n_video, n_audio)` is the method's own (Pruner.compute_share); by default a pre-LLM keep."""
        kept = total = 0.0
        for video, audio in signals:
            plan, n_video, n_audio = self.plan(video, audio), video.numel(), audio.numel()
            if share is None:
                kept += plan.joint_keep(n_video, n_audio)
            else:
                kept += share(plan, n_video, n_audio) * (n_video + n_audio)
            total += n_video + n_audio
        return kept / total if total else self.retention

    def calibrate(self, signals: list[tuple[torch.Tensor, torch.Tensor]], share=None) -> float:
        """Solve c_ref so that the mean compute share on `signals` (the method's own, `share`) matches the
        target (bisection, log scale)."""
        if self.retention >= 1.0 or not signals:
            return self.c_ref
        lo, hi = 1e-4, 1e4  # small c_ref -> every window at `hi`; large -> every window at `lo`
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            self.c_ref = mid
            if self.expected_kept(signals, share) > self.retention:
                lo = mid
            else:
                hi = mid
        self.c_ref = math.sqrt(lo * hi)
        return self.c_ref


def make_budget(name: str, retention: float, c_ref: float | None = None):
    if name == "fixed":
        return FixedBudget(retention)
    if name == "adaptive":
        return AdaptiveBudget(retention, c_ref)
    raise ValueError(f"unknown budget {name!r} (choose fixed or adaptive)")
