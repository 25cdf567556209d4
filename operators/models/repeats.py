"""A decoding constraint: a caption never says the same sentence twice.

A small captioner that loses its place in a busy clip tends to repeat a sentence it already said instead
of naming the next thing; a repeat adds nothing for a reader or for training data. With this constraint
the end of a sentence that would repeat an earlier one (same words, ignoring case and spacing) is not
allowed, so greedy decoding has to go on differently and beam search drops the beam for another.
Token n-gram bans (Hugging Face's no_repeat_ngram_size) cannot do this: legitimate sentences share long
runs of words ("when the noise starts, a red square is visible" / "when the tone starts, ...").
"""

from __future__ import annotations

import functools
import re
from typing import Callable

SENTENCE_END = re.compile(r"[.!?]\s*$")


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


class RepeatedSentenceBan:
    """Which sentence-ending tokens would, right now, complete a sentence the caption already has."""

    def __init__(self, decode: Callable[[list[int]], str], vocab_size: int):
        self.decode = decode
        # Tokens that end a sentence (their text ends in ., ! or ?), by their text without spaces.
        self._ends: dict[str, list[int]] = {}
        for t in range(vocab_size):
            text = decode([t]) or ""
            if SENTENCE_END.search(text):
                self._ends.setdefault("".join(text.split()).lower(), []).append(t)
        self._end_ids = {t for ids in self._ends.values() for t in ids}
        # A finished sentence is checked at every later step of its caption: decode it once.
        self._sentence_text = functools.lru_cache(maxsize=1 << 16)(lambda ids: _normalized(decode(list(ids))))

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "RepeatedSentenceBan":
        return cls(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), len(tokenizer))

    def sentences(self, tokens: list[int]) -> tuple[list[list[int]], list[int]]:
        """The caption's finished sentences (each with its end token) and the unfinished rest."""
        done, current = [], []
        for t in tokens:
            current.append(t)
            if t in self._end_ids:
                done.append(current)
                current = []
        return done, current

    def banned(self, tokens: list[int]) -> list[int]:
        done, partial = self.sentences(tokens)
        if not done or not partial:
            return []
        said = {self._sentence_text(tuple(s)) for s in done}
        body = _normalized(self.decode(partial))
        out = []
        for sentence in said:  # an end token that would complete one: the earlier sentence's rest is its text
            if sentence.startswith(body):
                rest = "".join(sentence[len(body):].split())
                out += [t for t in self._ends.get(rest, []) if _normalized(self.decode(partial + [t])) == sentence]
        return out
