"""Per-token content signals from the processor's tensors, before any model runs.

- Video novelty: how much a merged video token's pixels differ from the same spatial token one temporal
  grid earlier (tokens of the first grid are entirely new). A static scene scores ~0 after its first grid.
- Audio activity: whether the 40 ms of audio behind an audio token is audible, read from the Whisper
  log-mel features (absolute level, so an all-silent clip is recognised as silent).

Both are in [0, 1] and ordered like the video / audio tokens of the prompt. They drive the adaptive
budget (operators/pruning/budget.py) and are cheap enough for the driver's calibration pass.
"""

from __future__ import annotations

import torch

MERGE = 4  # a merged video token is a 2x2 block of ViT patches
MEL_FRAMES_PER_AUDIO_TOKEN = 4  # 100 mel frames/s -> 25 audio tokens/s
NOVELTY_SCALE = 0.15  # mean |Δ| (in CLIP-normalised pixel units) at which novelty reaches ~63%
SILENCE_LOG10_POWER = -5.5  # mel frames quieter than this (≈ -55 dB) count as silent


def video_novelty(pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> torch.Tensor:
    """(n_video_tokens,) novelty in [0, 1] for one video."""
    t, h, w = (int(x) for x in video_grid_thw.reshape(-1)[:3])
    tokens = pixel_values_videos.float().reshape(t, (h * w) // MERGE, -1)
    novelty = torch.ones(t, tokens.shape[1])
    if t > 1:
        diff = (tokens[1:] - tokens[:-1]).abs().mean(-1)
        novelty[1:] = 1.0 - torch.exp(-diff / NOVELTY_SCALE)
    return novelty.reshape(-1)


def audio_activity(input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> torch.Tensor:
    """(n_audio_tokens,) activity in [0, 1] for one audio track."""
    n = int(feature_attention_mask.sum())
    mel = input_features.reshape(input_features.shape[-2], -1)[:, :n].float()
    log10_power = mel * 4.0 - 4.0  # undo Whisper's (log10(power) + 4) / 4 scaling
    frame_level = log10_power.amax(dim=0)  # loudest mel bin per 10 ms frame
    tokens = (n - 1) // 2 + 1
    tokens = (tokens - 2) // 2 + 1  # the audio tower's output length for n frames
    pad = tokens * MEL_FRAMES_PER_AUDIO_TOKEN - n
    if pad > 0:
        frame_level = torch.cat([frame_level, frame_level.new_full((pad,), -10.0)])
    per_token = frame_level[: tokens * MEL_FRAMES_PER_AUDIO_TOKEN].reshape(tokens, -1).amax(-1)
    return torch.sigmoid((per_token - SILENCE_LOG10_POWER) * 4.0)


def sample_signals(sample: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(video novelty, audio activity) for one tokenized window; empty tensors for a missing modality."""
    video = (video_novelty(sample["pixel_values_videos"], sample["video_grid_thw"])
             if "pixel_values_videos" in sample else torch.zeros(0))
    audio = (audio_activity(sample["input_features"], sample["feature_attention_mask"])
             if "input_features" in sample else torch.zeros(0))
    return video, audio


def content_level(video: torch.Tensor, audio: torch.Tensor) -> float:
    """Fraction of the window's audio+video tokens that carry new information."""
    total = video.numel() + audio.numel()
    return float((video.sum() + audio.sum()) / total) if total else 0.0
