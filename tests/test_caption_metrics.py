"""CIDEr-D, BLEU-4 and fact F1 on hand-computed cases."""

import math

import pytest

from operators.metrics import bleu4, cider_d, corpus_fact_f1, fact_f1, visual_attributes


def test_cider_identical_and_empty():
    refs = {"a": ["a red circle moves left"], "b": ["a blue star stays still"], "c": ["slow beeps play here"]}
    assert cider_d({k: v[0] for k, v in refs.items()}, refs) == pytest.approx(10.0)
    assert cider_d({}, refs) == 0.0
    # A 3-word caption has no 4-grams: that n contributes 0, as in coco-caption.
    assert cider_d({"c": "slow beeps play"}, {"c": ["slow beeps play"], "d": ["x y z w"]}) == pytest.approx(7.5 / 2)


def test_cider_single_unigram_case_by_hand():
    # Two clips; the candidate for "x" shares only the unigram "red" (df=1 -> idf log 2) with its reference.
    refs = {"x": ["red circle"], "y": ["blue star"]}
    preds = {"x": "red square", "y": ""}
    # n=1: hyp {red:log2, square:log2}, ref {red:log2, circle:log2}: cos = log2^2 / (2 log2^2) = 0.5
    # n=2..4: no overlap. Same length -> no penalty. Clip x: 10 * 0.5 / 4 = 1.25; clip y: 0.
    assert cider_d(preds, refs) == pytest.approx(1.25 / 2)


def test_cider_length_penalty():
    refs = {"x": ["red circle"], "y": ["blue star"]}
    longer = {"x": "red square one two", "y": ""}
    # n=1 cosine: log2^2 / (sqrt(4) log2 * sqrt(2) log2) = 1 / (2 sqrt 2); delta = 2 -> exp(-4/72)
    expected = 10 * (1 / (2 * math.sqrt(2))) * math.exp(-4 / 72) / 4 / 2
    assert cider_d(longer, refs) == pytest.approx(expected)


def test_bleu4():
    refs = {"a": ["the cat sat on the mat"]}
    assert bleu4({"a": "the cat sat on the mat"}, refs) == pytest.approx(1.0)
    assert bleu4({"a": "the cat"}, refs) == 0.0  # no 3/4-grams
    # 5 of 6 tokens: precisions 5/5, 4/4, 3/3, 2/2; brevity exp(1 - 6/5)
    assert bleu4({"a": "the cat sat on the"}, refs) == pytest.approx(math.exp(1 - 6 / 5))


def test_fact_f1_partial_overlap():
    facts = ["a small red circle moves left", "a high tone plays", "when the tone starts, a red circle is visible"]
    mods = ["visual", "audio", "av"]
    pred = "a small red circle moves left. a low tone plays. when the tone starts, a red circle is visible. hello"
    scores = fact_f1(pred, facts, mods)
    assert scores["visual"] == 1.0
    assert scores["audio"] == 0.0  # predicted a low tone: 0 of 1 predicted, 0 of 1 reference
    assert scores["av"] == 1.0
    assert scores["all"] == pytest.approx(2 * 2 / (4 + 3))  # 2 hits, 4 predicted clauses, 3 facts


def test_corpus_fact_f1_is_micro_averaged_and_missing_counts_as_empty():
    facts = {"a": ["a small red circle moves left", "there is no sound"], "b": ["a high tone plays"]}
    mods = {"a": ["visual", "audio"], "b": ["audio"]}
    out = corpus_fact_f1({"a": "a small red circle moves left. there is no sound."}, facts, mods)
    assert out["fact_f1_visual"] == 1.0
    assert out["fact_f1_audio"] == pytest.approx(2 * 1 / (1 + 2))
    assert out["fact_f1"] == pytest.approx(2 * 2 / (2 + 3))


def test_visual_attributes_match_objects_by_colour():
    facts = {
        "a": ["a small red circle moves left", "a large blue star stays still", "a high tone plays"],
        "b": ["a large green square moves up"],
    }
    predictions = {
        "a": "a large red circle moves left. a large blue square stays still. a high tone plays.",
        "b": "a large white square moves up.",  # no green object: not matched
    }
    scores = visual_attributes(predictions, facts)
    assert scores == {"objects": 3, "colour_found": 2 / 3, "size": 0.5, "shape": 0.5, "motion": 1.0}
    assert visual_attributes({"c": "a low tone plays."}, {"c": ["a low tone plays"]}) == {}


def test_paired_f1_difference_is_the_corpus_difference_with_a_bootstrap_interval():
    from operators.metrics import paired_f1_difference

    b = [[1, 3, 3], [2, 2, 4], [0, 1, 2], [3, 4, 4]]
    same = paired_f1_difference(b, b, resamples=200)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "share_a_better": 0.0}
    a = [[tp + 1, pred, ref] for tp, pred, ref in b]  # one more right fact on every clip
    better = paired_f1_difference(a, b, resamples=200)
    assert better["diff"] == pytest.approx(2 * 10 / 23 - 2 * 6 / 23)  # totals: tp 10 vs 6, pred 10, ref 13
    assert 0 < better["low"] <= better["diff"] <= better["high"] and better["share_a_better"] == 1.0
    mixed = paired_f1_difference([[3, 3, 3], [0, 3, 3]], [[0, 3, 3], [3, 3, 3]], resamples=400)
    assert mixed["diff"] == 0.0 and mixed["low"] < 0 < mixed["high"]
