"""The no-repeated-sentence constraint: what it bans (real tokenizer), and greedy/beam decoding under it."""

import pytest
import torch

from operators.models.decoder import PrefillResult, PrunableDecoder
from operators.models.repeats import RepeatedSentenceBan


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from operators.models.embedded import EMBEDDED_MODEL_DIR

    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)


@pytest.fixture(scope="module")
def ban(tokenizer):
    return RepeatedSentenceBan.for_tokenizer(tokenizer)


def banned_text(ban, tokenizer, text):
    return [tokenizer.decode([t]) for t in ban.banned(tokenizer(text)["input_ids"])]


def test_the_end_of_a_repeated_sentence_is_banned(ban, tokenizer):
    assert banned_text(ban, tokenizer, "a small blue circle stays still. a small blue circle stays still") == ["."]
    # Case and spacing do not make a sentence new.
    assert banned_text(ban, tokenizer, "a small blue circle stays still. A small  blue circle stays still") == ["."]
    assert banned_text(ban, tokenizer, "a tone plays. a circle is visible. a tone plays") == ["."]


def test_new_sentences_and_unfinished_repeats_are_free(ban, tokenizer):
    assert banned_text(ban, tokenizer, "a small blue circle stays still") == []  # nothing said yet
    assert banned_text(ban, tokenizer, "a small blue circle stays still. a small blue circle stays") == []
    assert banned_text(ban, tokenizer, "a small blue circle stays still. a small red circle stays still") == []
    # Sentences may share long runs of words; only the whole sentence counts.
    assert banned_text(ban, tokenizer, "when the noise starts, a red square is visible. "
                                       "when the tone starts, a red square is visible") == []


# A scripted language model over 6 tokens, to check the decoding loops on their own: it would rather say
# "a tone." than "a beep.", and would rather go on than stop until it has said three sentences.
EOS, A, TONE, BEEP, DOT, SPACE = range(6)
WORDS = {EOS: "", A: " a", TONE: " tone", BEEP: " beep", DOT: ".", SPACE: " "}


def scripted_logits(history: list[int]) -> torch.Tensor:
    logits = torch.full((len(WORDS),), -20.0)  # off the script
    last = history[-1] if history else DOT
    if last == DOT:
        logits[A] = 2.0 if history.count(DOT) < 3 else -1.0
        logits[EOS] = 0.0
    elif last == A:
        logits[TONE], logits[BEEP] = 2.0, 1.0
    else:
        logits[DOT] = 2.0
    return logits


class HistoryCache:
    """Stands in for the KV cache: one token history per row, reordered and repeated as beams are."""

    def __init__(self, rows: int):
        self.histories = [[] for _ in range(rows)]

    def batch_repeat_interleave(self, k: int) -> None:
        self.histories = [list(h) for h in self.histories for _ in range(k)]

    def reorder_cache(self, rows: torch.Tensor) -> None:
        self.histories = [list(self.histories[int(r)]) for r in rows]


class ScriptedDecoder(PrunableDecoder):
    def __init__(self):  # no layers: _next_logits below is the whole model
        pass

    def _next_logits(self, token, position, layer_valid, generated, cache):
        for history, t in zip(cache.histories, token.tolist()):
            history.append(t)
        return torch.stack([scripted_logits(h) for h in cache.histories])


def run(num_beams: int, repeat_ban=None) -> str:
    cache = HistoryCache(1)
    prefill = PrefillResult(scripted_logits([])[None], cache, [torch.ones(1, 1, dtype=torch.bool)],
                            torch.zeros(1, dtype=torch.long), [], None, 0.0)
    (tokens,) = ScriptedDecoder().decode(prefill, 20, [EOS], num_beams=num_beams, repeat_ban=repeat_ban)
    return "".join(WORDS[t] for t in tokens).strip()


def scripted_ban() -> RepeatedSentenceBan:
    return RepeatedSentenceBan(lambda ids: "".join(WORDS[t] for t in ids), len(WORDS))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_decoding_under_the_ban_never_repeats_a_sentence(num_beams):
    assert run(num_beams) == "a tone. a tone. a tone."  # the model left to itself
    caption = run(num_beams, scripted_ban())
    if num_beams == 1:  # greedy cannot go back: the repeat stays unfinished, and the model stops
        assert caption == "a tone. a tone"
    else:  # beam search finds the model's next best sentence instead (in either order: equally likely)
        assert caption in ("a tone. a beep.", "a beep. a tone.")
