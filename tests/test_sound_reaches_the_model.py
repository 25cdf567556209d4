"""The sound really reaches the model, in each engine: one synthetic clip's picture with another clip's
sound is captioned with the second clip's sounds, not the first's (peers' users report engines that drop
the audio of audio-in-video without a word)."""

from __future__ import annotations

import dataclasses

import pytest

from operators import tokenize as tok
from operators.models.qwen2_5_omni import load_processor, model_card
from operators.synth import grammar, world
from pipelines.config import DEFAULT_PROMPT

PAIRS = 3


def _sounds(spec) -> set[str]:
    return {grammar.audio_fact(ev.kind, ev.variant) for ev in spec.sounds}


def _swapped_pairs(n: int) -> list[tuple]:
    """(picture spec, sound spec) pairs from the validation seeds whose sounds have nothing in common."""
    pairs, index, previous = [], 0, None
    while len(pairs) < n:
        spec = world.sample_clip(world.clip_rng("val", 101, index))
        index += 1
        if not spec.sounds:
            continue
        if previous is not None and previous.duration_s == spec.duration_s and not _sounds(previous) & _sounds(spec):
            pairs.append((previous, spec))
            previous = None
        else:
            previous = spec
    return pairs


def _window(processor, picture, sound, engine: str, pixels: dict) -> bytes:
    frames = world.render_video(picture)[:: picture.fps // 2]  # 2 frames per second
    frames = frames[: len(frames) // 2 * 2]
    audio = world.render_audio(sound)
    tensors = tok.model_inputs(processor, frames, 2.0, audio, DEFAULT_PROMPT, pixels["max_pixels"],
                               pixels["min_pixels"])
    if engine == "hf":
        return tok.pack(tensors)
    return tok.pack_compact(tensors["input_ids"], frames, 2.0, audio, tok.build_prompt(processor, DEFAULT_PROMPT),
                            tok.video_size(processor, pixels["max_pixels"], pixels["min_pixels"]))


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_captioned_sounds_follow_the_audio_not_the_picture(engine, model_source, request, monkeypatch):
    captioner = request.getfixturevalue(f"{engine}_captioner")
    monkeypatch.setattr(captioner, "settings", dataclasses.replace(captioner.settings, max_new_tokens=128))
    processor = load_processor(model_source)
    pixels = model_card(model_source)["preprocess"]
    pairs = _swapped_pairs(PAIRS)
    captions = [r["caption"] for r in captioner.caption([_window(processor, a, b, engine, pixels) for a, b in pairs])]
    for (picture, sound), caption in zip(pairs, captions):
        heard = {fact for fact in _sounds(picture) | _sounds(sound) if fact in caption}
        assert heard & _sounds(sound), (caption, _sounds(sound))  # the sound it was given
        assert not heard & _sounds(picture), (caption, _sounds(picture))  # not the picture's own sound
