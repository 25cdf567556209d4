"""Tokenized windows made from synthetic frames/audio, for model-level tests (no decoding involved)."""

from __future__ import annotations

import numpy as np

PROMPT = "Describe the clip."


def make_sample(processor, seed: int, frames: int = 8, seconds: float = 4.0, audio: str | None = "noise",
                video: str | None = "noise", size=(120, 160)):
    """audio: "noise" | "silent" | None (no audio stream); video: "noise" | "static" | None (sound alone)."""
    from operators.tokenize import model_inputs

    rng = np.random.default_rng(seed)
    h, w = size
    if video == "static":
        pixels = np.repeat((rng.random((1, h, w, 3)) * 255).astype(np.uint8), frames, axis=0)
    else:
        pixels = (rng.random((frames, h, w, 3)) * 255).astype(np.uint8)
    wave = None
    if audio == "noise":
        wave = (rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)
    elif audio == "silent":
        wave = np.zeros(int(16000 * seconds), dtype=np.float32)
    return model_inputs(processor, pixels if video else None, frames / seconds, wave, PROMPT, max_pixels=168 * 168,
                        min_pixels=56 * 56)
