"""The closed caption grammar of the synthetic world.

Single source of truth for every word a reference caption can contain: the world
(`world.py`) builds facts with the helpers below and the metrics
(`operators/metrics.py`) parse predicted captions with `fact_modality`, so the two
can never drift apart.

A caption is a list of facts, each one clause, joined as "fact. fact. fact.", in order of onset.
Templates:

  visual  a {size} {colour} {shape} {motion}
  audio   a {low|high} tone plays
          {fast|slow} beeps play
          a noise burst plays
          a rising chirp plays
          there is no sound

Events have onsets and lengths in the world, but captions carry no absolute times: a model would have
to count positions to name a second, which says little about what a pruner keeps. Time enters through
the order of facts and through the cross-modal facts below, which need audio and video aligned in time.
  av      when the {tone|noise|chirp} starts, a {colour} {shape} is visible
          when the beeps start, a {colour} {shape} is visible
          when the {...} starts, nothing is visible
"""

from __future__ import annotations

import re

SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "white")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
# Motion keyword -> phrase used in the caption.
MOTIONS = {
    "still": "stays still",
    "left": "moves left",
    "right": "moves right",
    "up": "moves up",
    "down": "moves down",
}
# Sound kinds and their variants ("" = the kind has no variant).
SOUND_VARIANTS = {
    "tone": ("low", "high"),
    "beeps": ("fast", "slow"),
    "noise": ("",),
    "chirp": ("",),
}
MAX_TIME_S = 8  # longest clip (s)
NO_SOUND = "there is no sound"

VISUAL, AUDIO, AV = "visual", "audio", "av"


def visual_fact(size: str, colour: str, shape: str, motion: str) -> str:
    return f"a {size} {colour} {shape} {MOTIONS[motion]}"


def sound_phrase(kind: str, variant: str) -> str:
    """The subject+verb of an audio fact, e.g. 'a high tone plays'."""
    if kind == "tone":
        return f"a {variant} tone plays"
    if kind == "beeps":
        return f"{variant} beeps play"
    if kind == "noise":
        return "a noise burst plays"
    if kind == "chirp":
        return "a rising chirp plays"
    raise ValueError(f"unknown sound kind {kind!r}")


def audio_fact(kind: str, variant: str) -> str:
    return sound_phrase(kind, variant)


def av_fact(kind: str, colour: str | None, shape: str | None) -> str:
    """'when the <sound> starts, <object|nothing> is visible' (colour=None -> nothing)."""
    verb = "start" if kind == "beeps" else "starts"  # plural noun
    what = "nothing" if colour is None else f"a {colour} {shape}"
    return f"when the {kind} {verb}, {what} is visible"


def join_caption(facts: list[str]) -> str:
    return "".join(f"{f}. " for f in facts).strip()


# ---------------------------------------------------------------- parsing ---

def _alt(words) -> str:
    return "(?:" + "|".join(re.escape(w) for w in words) + ")"


_VISUAL_RE = re.compile(rf"^a {_alt(SIZES)} {_alt(COLOURS)} {_alt(SHAPES)} {_alt(MOTIONS.values())}$")
_AUDIO_RE = re.compile(
    rf"^(?:a {_alt(SOUND_VARIANTS['tone'])} tone plays|{_alt(SOUND_VARIANTS['beeps'])} beeps play"
    rf"|a noise burst plays|a rising chirp plays)$|^{NO_SOUND}$"
)
_AV_RE = re.compile(
    rf"^when the (?:(?:tone|noise|chirp) starts|beeps start), "
    rf"(?:a {_alt(COLOURS)} {_alt(SHAPES)}|nothing) is visible$"
)


def normalize_clause(text: str) -> str:
    """Lower-case, keep words/numbers/commas, single spaces: '1s' -> '1 s', 'A  Red' -> 'a red'."""
    toks = re.findall(r"[a-z]+|\d+|,", text.lower())
    return " ".join(toks).replace(" ,", ",").strip(", ")


def split_clauses(caption: str) -> list[str]:
    """Split a caption into normalized clauses on '.', ';' or newlines (not on decimal points)."""
    parts = re.split(r"(?<!\d)\.|\.(?!\d)|;|\n", caption or "")
    return [c for c in (normalize_clause(p) for p in parts) if c]


def fact_modality(clause: str) -> str | None:
    """Modality of a normalized clause by its template, or None if outside the grammar."""
    if _VISUAL_RE.match(clause):
        return VISUAL
    if _AUDIO_RE.match(clause):
        return AUDIO
    if _AV_RE.match(clause):
        return AV
    return None


# ------------------------------------------------------------ vocabulary ---

def caption_corpus() -> list[str]:
    """Sentences that together use every template and word of the grammar."""
    out: list[str] = []
    for size in SIZES:
        for colour in COLOURS:
            for shape in SHAPES:
                for motion in MOTIONS:
                    out.append(visual_fact(size, colour, shape, motion) + ".")
    for kind, variants in SOUND_VARIANTS.items():
        for variant in variants:
            out.append(audio_fact(kind, variant) + ".")
    out.append(NO_SOUND + ".")
    for kind in SOUND_VARIANTS:
        out.append(av_fact(kind, None, None) + ".")
        for colour in COLOURS:
            for shape in SHAPES:
                out.append(av_fact(kind, colour, shape) + ".")
    return out


def _vocabulary() -> list[str]:
    seen: dict[str, None] = {}
    for sentence in caption_corpus():
        for tok in re.findall(r"[a-z]+|\d+|[.,]", sentence):
            seen.setdefault(tok, None)
    return list(seen)


# Every token the grammar can produce (words, "." and ",").
VOCABULARY: list[str] = _vocabulary()
