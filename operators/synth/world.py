"""A tiny synthetic audio-visual world with exact, parseable captions.

A clip is a `ClipSpec` (frozen dataclasses, a pure description); pixels, samples,
captions and the mp4 are all pure functions of the spec, so a clip is reproducible
from its spec alone and the RNG is only used once, in `sample_clip`.

Splits: `clip_rng(split, seed, index)` seeds numpy with
SeedSequence([SPLIT_CODES[split], seed, index]); train/val/test with the same seed
draw from unrelated streams, and each clip is independent of N (clip i is the same
whether you make 10 or 10,000).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from matplotlib.path import Path as _MplPath

from operators.synth import grammar
from operators.synth.grammar import (  # re-exported: the public API lives here
    AUDIO,
    AV,
    VISUAL,
    VOCABULARY,
    caption_corpus,
)

__all__ = [
    "AudioEvent", "Background", "ClipSpec", "VisualObject", "VOCABULARY", "SPLIT_CODES",
    "caption_corpus", "caption_facts", "clip_rng", "encode_clip", "render_audio",
    "render_video", "sample_clip", "write_clip",
]

FPS = 25
WIDTH, HEIGHT = 160, 120
SAMPLE_RATE = 16000
SPLIT_CODES = {"train": 1, "val": 2, "test": 3}

RGB = {  # saturated, clearly distinct hues; backgrounds are dark and desaturated
    "red": (230, 30, 30),
    "green": (40, 210, 60),
    "blue": (50, 90, 255),
    "yellow": (245, 225, 40),
    "white": (250, 250, 250),
}
RADIUS = {"small": 16, "large": 26}  # 32-52 px: shapes span several 14-px patches (at 11/19 a ViT read shape near chance)
TONE_HZ = {"low": 300.0, "high": 1200.0}
BEEP_HZ = 900.0
BEEP_PERIOD_S = {"fast": (0.125, 0.06), "slow": (0.5, 0.2)}  # (period, on-time)
CHIRP_HZ = (300.0, 2500.0)


@dataclass(frozen=True)
class VisualObject:
    shape: str
    colour: str
    size: str
    motion: str  # key of grammar.MOTIONS
    onset_s: int  # visible on frames [onset_s*fps, offset_s*fps)
    offset_s: int
    start_xy: tuple[float, float]  # centre at onset and at offset (linear in between)
    end_xy: tuple[float, float]


@dataclass(frozen=True)
class AudioEvent:
    kind: str  # tone | beeps | noise | chirp (at most one of each per clip)
    variant: str  # low/high for tone, fast/slow for beeps, "" otherwise
    onset_s: int  # audible on [onset_s, offset_s)
    offset_s: int


@dataclass(frozen=True)
class Background:
    style: str  # plain | gradient | noise
    colour_a: tuple[int, int, int]
    colour_b: tuple[int, int, int]  # gradient end colour
    vertical: bool  # gradient direction
    texture_seed: int  # noise texture
    specks: tuple[tuple[int, int, int], ...]  # (x, y, size) faint grey dots, never captioned
    lines: tuple[tuple[int, int, int, int], ...]  # (x0, y0, x1, y1) faint lines, never captioned


@dataclass(frozen=True)
class ClipSpec:
    duration_s: int
    background: Background
    objects: tuple[VisualObject, ...]
    sounds: tuple[AudioEvent, ...]
    noise_seed: int  # for the noise-burst samples
    fps: int = FPS
    width: int = WIDTH
    height: int = HEIGHT
    sample_rate: int = SAMPLE_RATE


# --------------------------------------------------------------- sampling ---

def clip_rng(split: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([SPLIT_CODES[split], int(seed), int(index)]))


def _dark_colour(rng) -> tuple[int, int, int]:
    base = int(rng.integers(20, 80))
    return tuple(int(np.clip(base + rng.integers(-15, 16), 0, 255)) for _ in range(3))


def _sample_background(rng, w: int, h: int) -> Background:
    specks = tuple(
        (int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(1, 3)))
        for _ in range(int(rng.integers(0, 13)))
    )
    lines = []
    for _ in range(int(rng.integers(0, 3))):
        x0, x1 = (int(v) for v in rng.integers(0, w, 2))
        y0, y1 = (int(v) for v in rng.integers(0, h, 2))
        lines.append((x0, y0, x1, y1))
    return Background(
        style=str(rng.choice(["plain", "gradient", "noise"])),
        colour_a=_dark_colour(rng),
        colour_b=_dark_colour(rng),
        vertical=bool(rng.integers(0, 2)),
        texture_seed=int(rng.integers(0, 2**31)),
        specks=specks,
        lines=tuple(lines),
    )


def _sample_path(rng, motion: str, r: int, w: int, h: int):
    lo_x, hi_x, lo_y, hi_y = r + 2, w - r - 2, r + 2, h - r - 2
    x, y = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
    if motion == "still":
        return (x, y), (x, y)
    horizontal = motion in ("left", "right")
    lo, hi = (lo_x, hi_x) if horizontal else (lo_y, hi_y)
    dist = float(rng.uniform(30, hi - lo))  # long enough to be seen as motion
    a = float(rng.uniform(lo, hi - dist))
    b = a + dist
    if motion in ("left", "up"):  # image y grows downwards, so "up" decreases y
        a, b = b, a
    return ((a, y), (b, y)) if horizontal else ((x, a), (x, b))


def _centre(obj: VisualObject, t_s: float) -> tuple[float, float]:
    u = (t_s - obj.onset_s) / max(obj.offset_s - obj.onset_s, 1e-9)
    (x0, y0), (x1, y1) = obj.start_xy, obj.end_xy
    return x0 + u * (x1 - x0), y0 + u * (y1 - y0)


def _collides(a: VisualObject, b: VisualObject) -> bool:
    """True if a and b ever get close while both visible (keeps every object readable)."""
    t0, t1 = max(a.onset_s, b.onset_s), min(a.offset_s, b.offset_s)
    gap = RADIUS[a.size] + RADIUS[b.size] + 4
    if t1 <= t0:
        return False
    for t in np.linspace(t0, t1, 4 * (t1 - t0) + 1):
        (xa, ya), (xb, yb) = _centre(a, t), _centre(b, t)
        if (xa - xb) ** 2 + (ya - yb) ** 2 < gap**2:
            return True
    return False


def _sample_objects(rng, duration: int, w: int, h: int) -> tuple[VisualObject, ...]:
    n = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    objs: list[VisualObject] = []
    for _ in range(n):
        for _try in range(50):
            shape, colour = str(rng.choice(grammar.SHAPES)), str(rng.choice(grammar.COLOURS))
            size, motion = str(rng.choice(grammar.SIZES)), str(rng.choice(list(grammar.MOTIONS)))
            onset = int(rng.integers(0, duration - 1))
            offset = int(rng.integers(onset + 2, duration + 1))  # >= 2 s on screen
            start, end = _sample_path(rng, motion, RADIUS[size], w, h)
            obj = VisualObject(shape, colour, size, motion, onset, offset, start, end)
            # (colour, shape) is unique per clip so "a red circle is visible" is unambiguous.
            if any((o.colour, o.shape) == (colour, shape) or _collides(o, obj) for o in objs):
                continue
            objs.append(obj)
            break
    return tuple(objs)


def _sample_sounds(rng, duration: int) -> tuple[AudioEvent, ...]:
    n = int(rng.choice([0, 1, 2, 3], p=[0.2, 0.35, 0.3, 0.15]))
    kinds = rng.choice(list(grammar.SOUND_VARIANTS), size=n, replace=False)  # distinct kinds
    out = []
    for kind in kinds:
        kind = str(kind)
        variant = str(rng.choice(grammar.SOUND_VARIANTS[kind]))
        onset = int(rng.integers(0, duration))
        length = int(rng.integers(1, min(3, duration - onset) + 1))
        out.append(AudioEvent(kind, variant, onset, onset + length))
    return tuple(out)


def sample_clip(rng: np.random.Generator) -> ClipSpec:
    duration = int(rng.integers(4, grammar.MAX_TIME_S + 1))  # 4..8 s
    return ClipSpec(
        duration_s=duration,
        background=_sample_background(rng, WIDTH, HEIGHT),
        objects=_sample_objects(rng, duration, WIDTH, HEIGHT),
        sounds=_sample_sounds(rng, duration),
        noise_seed=int(rng.integers(0, 2**31)),
    )


# ---------------------------------------------------------------- picture ---

def _polygon(shape: str, r: float) -> np.ndarray:
    if shape == "square":
        k = 0.85 * r  # same visual weight as the circle
        return np.array([[-k, -k], [k, -k], [k, k], [-k, k]])
    if shape == "diamond":
        return np.array([[0, -r], [r, 0], [0, r], [-r, 0]])
    if shape == "triangle":  # pointing up
        return np.array([[0, -r], [0.87 * r, 0.5 * r], [-0.87 * r, 0.5 * r]])
    if shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    raise ValueError(shape)


def _shape_mask(shape: str, r: int) -> np.ndarray:
    """Boolean (2r+1, 2r+1) mask centred on the middle pixel."""
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
    if shape == "circle":
        return xx**2 + yy**2 <= r * r
    pts = np.stack([xx.ravel(), yy.ravel()], axis=1)
    return _MplPath(_polygon(shape, r)).contains_points(pts, radius=0.01).reshape(xx.shape)


def _background(spec: ClipSpec) -> np.ndarray:
    bg, w, h = spec.background, spec.width, spec.height
    a, b = np.array(bg.colour_a, np.float32), np.array(bg.colour_b, np.float32)
    img = np.broadcast_to(a, (h, w, 3)).copy()
    if bg.style == "gradient":
        u = np.linspace(0, 1, h if bg.vertical else w, dtype=np.float32)
        u = u[:, None, None] if bg.vertical else u[None, :, None]
        img = a + u * (b - a) + np.zeros((h, w, 1), np.float32)
    elif bg.style == "noise":  # static texture: costs bits once, not every frame
        tex = np.random.default_rng(bg.texture_seed).normal(0, 6, (h, w, 1)).astype(np.float32)
        img = img + tex
    grey = float(np.mean(a)) + 25  # faint distractors, never captioned
    for x0, y0, x1, y1 in bg.lines:
        n = max(abs(x1 - x0), abs(y1 - y0)) + 1
        xs = np.round(np.linspace(x0, x1, n)).astype(int)
        ys = np.round(np.linspace(y0, y1, n)).astype(int)
        img[ys, xs] = grey - 5
    for x, y, s in bg.specks:
        img[y : y + s, x : x + s] = grey
    return np.clip(img, 0, 255).astype(np.uint8)


def render_video(spec: ClipSpec) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB frames, T = duration_s * fps."""
    bg = _background(spec)
    n = spec.duration_s * spec.fps
    frames = np.repeat(bg[None], n, axis=0)
    for obj in spec.objects:
        r = RADIUS[obj.size]
        mask = _shape_mask(obj.shape, r)
        colour = np.array(RGB[obj.colour], np.uint8)
        for f in range(obj.onset_s * spec.fps, obj.offset_s * spec.fps):
            cx, cy = _centre(obj, f / spec.fps)
            x0, y0 = int(round(cx)) - r, int(round(cy)) - r
            # Clip the mask to the frame (paths keep objects inside; this is just safety).
            ys, xs = slice(max(y0, 0), min(y0 + 2 * r + 1, spec.height)), slice(max(x0, 0), min(x0 + 2 * r + 1, spec.width))
            m = mask[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
            frames[f, ys, xs][m] = colour
    return frames


# ------------------------------------------------------------------ sound ---

def _fade(x: np.ndarray, sr: int) -> np.ndarray:
    k = min(int(0.01 * sr), len(x) // 2)  # 10 ms ramps: no clicks at event edges
    if k:
        ramp = np.linspace(0, 1, k, dtype=np.float32)
        x[:k] *= ramp
        x[-k:] *= ramp[::-1]
    return x


def _event_samples(ev: AudioEvent, sr: int, noise_rng) -> np.ndarray:
    n = (ev.offset_s - ev.onset_s) * sr
    t = np.arange(n, dtype=np.float64) / sr
    if ev.kind == "tone":
        x = 0.3 * np.sin(2 * np.pi * TONE_HZ[ev.variant] * t)
    elif ev.kind == "beeps":
        period, on = BEEP_PERIOD_S[ev.variant]
        gate = (t % period) < on
        x = 0.3 * np.sin(2 * np.pi * BEEP_HZ * t) * gate
    elif ev.kind == "noise":
        x = np.clip(noise_rng.normal(0, 0.1, n), -0.4, 0.4)
    elif ev.kind == "chirp":
        f0, f1 = CHIRP_HZ
        dur = n / sr
        x = 0.3 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * dur)))
    else:
        raise ValueError(ev.kind)
    return _fade(x.astype(np.float32), sr)


def render_audio(spec: ClipSpec) -> np.ndarray:
    """float32 mono samples at spec.sample_rate (16 kHz), length duration_s * sample_rate."""
    sr = spec.sample_rate
    out = np.zeros(spec.duration_s * sr, np.float32)
    noise_rng = np.random.default_rng(spec.noise_seed)
    for ev in spec.sounds:
        out[ev.onset_s * sr : ev.offset_s * sr] += _event_samples(ev, sr, noise_rng)
    return np.clip(out, -1.0, 1.0)


# ---------------------------------------------------------------- caption ---

_RANK = {VISUAL: 0, AUDIO: 1, AV: 2}


def caption_facts(spec: ClipSpec) -> tuple[str, list[str], list[str]]:
    """(caption, facts, fact_modalities) in canonical order.

    Order: by onset second; on ties visual < audio < av, then alphabetical. The
    "there is no sound" fact of a silent clip comes last.
    """
    keyed: list[tuple[int, int, str, str]] = []
    for o in spec.objects:
        fact = grammar.visual_fact(o.size, o.colour, o.shape, o.motion)
        keyed.append((o.onset_s, _RANK[VISUAL], fact, VISUAL))
    for ev in spec.sounds:
        fact = grammar.audio_fact(ev.kind, ev.variant)
        keyed.append((ev.onset_s, _RANK[AUDIO], fact, AUDIO))
        # Cross-modal: what is on screen at the second the sound starts.
        visible = [o for o in spec.objects if o.onset_s <= ev.onset_s < o.offset_s]
        whats = [(o.colour, o.shape) for o in visible] or [(None, None)]
        for colour, shape in whats:
            keyed.append((ev.onset_s, _RANK[AV], grammar.av_fact(ev.kind, colour, shape), AV))
    keyed.sort()
    if not spec.sounds:
        keyed.append((10**9, _RANK[AUDIO], grammar.NO_SOUND, AUDIO))
    facts = [k[2] for k in keyed]
    return grammar.join_caption(facts), facts, [k[3] for k in keyed]


def sound_caption_facts(spec: ClipSpec) -> tuple[str, list[str], list[str]]:
    """caption_facts of the clip's sound alone (an audio-only file of it): its audio facts, in order."""
    _, facts, modalities = caption_facts(spec)
    kept = [(f, m) for f, m in zip(facts, modalities) if m == AUDIO]
    return grammar.join_caption([f for f, _ in kept]), [f for f, _ in kept], [m for _, m in kept]


# ------------------------------------------------------------------- mp4 ---

AUDIO_FRAME = 1024  # AAC frame size


def _aac_stream(box, sample_rate: int):
    """The world's audio stream: AAC mono at 32 kb/s (an audio-visual clip and its sound alone alike)."""
    return box.add_stream("aac", rate=sample_rate, layout="mono", options={"b": "32000"})


def _audio_frame(audio: np.ndarray, start: int, sample_rate: int):
    """Samples [start, start + AUDIO_FRAME) as a PyAV frame stamped in samples."""
    import av

    frame = av.AudioFrame.from_ndarray(audio[None, start:start + AUDIO_FRAME], format="fltp", layout="mono")
    frame.sample_rate, frame.pts = sample_rate, start
    return frame


def encode_clip(spec: ClipSpec, crf: int = 30) -> bytes:
    """H.264 (yuv420p) + AAC mono 16 kHz in mp4, as bytes.

    x264 runs single-threaded so the bytes do not depend on the machine's core count.
    """
    import av  # local import: the rest of the module is usable without PyAV

    video, audio = render_video(spec), render_audio(spec)
    sr, fps = spec.sample_rate, spec.fps
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as box:
        vs = box.add_stream("libx264", rate=fps, options={"crf": str(crf), "threads": "1"})
        vs.width, vs.height, vs.pix_fmt = spec.width, spec.height, "yuv420p"
        aus = _aac_stream(box, sr)
        apos = 0
        for i, frame in enumerate(video):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = i
            box.mux(vs.encode(vf))
            # Interleave: feed audio up to the end of this video frame.
            while apos < min((i + 1) * sr // fps, len(audio)):
                box.mux(aus.encode(_audio_frame(audio, apos, sr)))
                apos += len(audio[apos : apos + AUDIO_FRAME])
        box.mux(vs.encode(None))
        box.mux(aus.encode(None))
    return buf.getvalue()


def encode_sound(spec: ClipSpec) -> bytes:
    """The clip's sound alone: AAC mono 16 kHz in an .m4a (no video stream), as bytes."""
    import av

    audio, sr = render_audio(spec), spec.sample_rate
    buf = io.BytesIO()
    with av.open(buf, "w", format="ipod") as box:
        stream = _aac_stream(box, sr)
        for start in range(0, len(audio), AUDIO_FRAME):
            box.mux(stream.encode(_audio_frame(audio, start, sr)))
        box.mux(stream.encode(None))
    return buf.getvalue()


def write_clip(spec: ClipSpec, path: str, sound_only: bool = False) -> None:
    """Encode and write the clip (or, with sound_only, its sound as an .m4a) to a local path or any fsspec URI."""
    import fsspec

    data = encode_sound(spec) if sound_only else encode_clip(spec)
    with fsspec.open(path, "wb") as f:
        f.write(data)
