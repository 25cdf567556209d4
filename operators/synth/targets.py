"""Per-token ground truth of a synthetic clip, for training the embedded model's encoders.

The caption loss alone reaches the vision tower only through the language model, and a from-scratch
tower barely moves in an hour of CPU training (the first model learned sound, not colour or shape).
So training adds dense targets: each merged video token is told what object covers its cell in its
frame pair (colour, shape, size, motion, or none), and each audio token which sounds play during
its 40 ms. These targets exist only in training; the shipped model is the plain thinker.

Geometry follows the caption job's own preprocessing: frames sampled at (i + 0.5) / fps
(operators/decode.frame_times), two frames per temporal patch, and Qwen2-VL's patch order
(t, h / merge, w / merge, merge, merge), which the vision tower's merger keeps.
"""

from __future__ import annotations

import re

import numpy as np

from operators.synth import grammar, world

IGNORE = -100
VISION_CLASSES = {  # class 0 of each head is "no object here"
    "colour": ("none", *grammar.COLOURS),
    "shape": ("none", *grammar.SHAPES),
    "size": ("none", *grammar.SIZES),
    "motion": ("none", *grammar.MOTIONS),
}
AUDIO_CLASSES = tuple((kind, variant) for kind, variants in grammar.SOUND_VARIANTS.items() for variant in variants)
AUDIO_TOKEN_S = 0.04  # Whisper frames are 10 ms; the audio tower halves twice
_NAME = re.compile(r"^(train|val|test)-s(\d+)-(\d+)\.(?:mp4|m4a)$")  # m4a: the sound alone
MIN_COVER = 0.05  # fraction of a cell an object must cover to label it


def spec_for_file(name: str) -> world.ClipSpec:
    """The ClipSpec of a file written by pipelines.synthesize (its name encodes split, seed, index; a clip
    and its sound alone share it)."""
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"not a synthetic clip name: {name!r}")
    split, seed, index = match.group(1), int(match.group(2)), int(match.group(3))
    return world.sample_clip(world.clip_rng(split, seed, index))


def _object_map(spec: world.ClipSpec, t_s: float) -> np.ndarray:
    """(H, W) int map: index of the object drawn at each pixel at time t_s, -1 for background."""
    out = np.full((spec.height, spec.width), -1, np.int16)
    frame = int(round(t_s * spec.fps))
    for k, obj in enumerate(spec.objects):
        if not obj.onset_s * spec.fps <= frame < obj.offset_s * spec.fps:
            continue
        r = world.RADIUS[obj.size]
        mask = world._shape_mask(obj.shape, r)
        cx, cy = world._centre(obj, frame / spec.fps)
        ys, xs = np.nonzero(mask)
        ys, xs = ys + int(round(cy)) - r, xs + int(round(cx)) - r
        keep = (ys >= 0) & (ys < spec.height) & (xs >= 0) & (xs < spec.width)
        out[ys[keep], xs[keep]] = k
    return out


def vision_targets(spec: world.ClipSpec, grid_thw, fps: float = 2.0, merge: int = 2) -> np.ndarray:
    """(t * h/merge * w/merge, 4) int64 class ids per merged video token, heads in VISION_CLASSES order."""
    t, h, w = (int(v) for v in grid_thw)
    hm, wm = h // merge, w // merge
    # Cell edges in source pixels (the processor resizes the whole frame to h*14 x w*14).
    ys = np.linspace(0, spec.height, hm + 1).round().astype(int)
    xs = np.linspace(0, spec.width, wm + 1).round().astype(int)
    out = np.zeros((t, hm, wm, 4), np.int64)
    for g in range(t):
        # Middle of the two frames of temporal patch g; objects appear and leave on whole seconds.
        owner = _object_map(spec, (2 * g + 1) / fps)
        for i in range(hm):
            for j in range(wm):
                cell = owner[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
                counts = np.bincount(cell.ravel() + 1, minlength=len(spec.objects) + 1)[1:]
                if counts.size and counts.max() >= MIN_COVER * cell.size:
                    obj = spec.objects[int(counts.argmax())]
                    out[g, i, j] = [VISION_CLASSES["colour"].index(obj.colour),
                                    VISION_CLASSES["shape"].index(obj.shape),
                                    VISION_CLASSES["size"].index(obj.size),
                                    VISION_CLASSES["motion"].index(obj.motion)]
    return out.reshape(-1, 4)


def audio_targets(spec: world.ClipSpec, n_tokens: int) -> np.ndarray:
    """(n_tokens, len(AUDIO_CLASSES)) float32: 1 where that sound plays during the token's 40 ms."""
    mid = (np.arange(n_tokens) + 0.5) * AUDIO_TOKEN_S
    out = np.zeros((n_tokens, len(AUDIO_CLASSES)), np.float32)
    for ev in spec.sounds:
        col = AUDIO_CLASSES.index((ev.kind, ev.variant))
        out[(mid >= ev.onset_s) & (mid < ev.offset_s), col] = 1.0
    return out


# Attribute pairs the enumeration target names objects by: pairs rather than single attributes, so the
# target says which colour goes with which shape, size and motion (the captioner's misses are mostly whole
# objects left out or two objects' attributes swapped, not a wrong single word). All six pairs of the
# four attributes: with only size-colour for size, size was the attribute most often wrong (v17,
# docs/experiments.md).
ENUMERATION_PAIRS = (("colour", "shape"), ("colour", "motion"), ("shape", "motion"), ("size", "colour"),
                     ("size", "shape"), ("size", "motion"))
_ATTRIBUTE_VALUES = {"size": grammar.SIZES, "colour": grammar.COLOURS, "shape": grammar.SHAPES,
                     "motion": tuple(grammar.MOTIONS)}
ENUMERATION_CLASSES = tuple(f"{a}={x},{b}={y}" for a, b in ENUMERATION_PAIRS
                            for x in _ATTRIBUTE_VALUES[a] for y in _ATTRIBUTE_VALUES[b])
MAX_OBJECTS = 3  # world._sample_objects draws 1 to 3
_MOTION_KEY = {phrase: key for key, phrase in grammar.MOTIONS.items()}


def _visual_clauses(caption: str) -> list[tuple[int, dict[str, str]]]:
    """(start character, attributes) of each visual clause of a reference caption, in caption order."""
    out = []
    for match in re.finditer(r"[^.]+", caption):
        clause = match.group()
        if grammar.fact_modality(grammar.normalize_clause(clause)) != grammar.VISUAL:
            continue
        _, size, colour, shape, *motion = clause.split()
        start = match.start() + len(clause) - len(clause.lstrip())
        out.append((start, {"size": size, "colour": colour, "shape": shape, "motion": _MOTION_KEY[" ".join(motion)]}))
    return out


def enumeration_targets(caption: str, token_ends: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """What is still to be named at each caption token: for the position that predicts caption token j
    (j = 0 .. n, n being the end token), a multi-hot (n + 1, len(ENUMERATION_CLASSES)) float32 of the
    attribute pairs of the visual objects whose clause starts at token j or later, and their count
    (n + 1,) int64. token_ends[j] is the end character of caption token j (the tokenizer's offsets)."""
    n = len(token_ends)
    pairs = np.zeros((n + 1, len(ENUMERATION_CLASSES)), np.float32)
    count = np.zeros(n + 1, np.int64)
    for start, attrs in _visual_clauses(caption):
        first = next(j for j, end in enumerate(token_ends) if end > start)  # the token the clause starts in
        count[:first + 1] += 1
        named = [ENUMERATION_CLASSES.index(f"{a}={attrs[a]},{b}={attrs[b]}") for a, b in ENUMERATION_PAIRS]
        pairs[:first + 1, named] = 1.0
    return pairs, count
