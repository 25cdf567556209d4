"""Caption metrics in plain Python: CIDEr-D, BLEU-4 and fact F1 for the synthetic world.

CIDEr-D and BLEU-4 follow the coco-caption definitions (no Java tokenizer: lower-cased word tokens).
Fact F1 parses captions into the world's clauses (operators/synth/grammar.py) and counts exact clause
matches, micro-averaged over the corpus, overall and per modality:
- "visual": facts only in the picture, "audio": facts only in the sound, "av": facts that need both
  (what is visible when a sound starts). Each predicted clause gets its modality from its template; a
  clause outside the grammar counts against overall precision only.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from operators.synth.grammar import AUDIO, AV, VISUAL, fact_modality, split_clauses

MODALITIES = (VISUAL, AUDIO, AV)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", (text or "").lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


# ---- CIDEr-D -------------------------------------------------------------------------------------
def cider_d(predictions: dict, references: dict, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (x10 scaling, clipped candidate tf, Gaussian length penalty), averaged over ids."""
    ids = list(references)
    if not ids:
        return 0.0
    ref_counts = {i: [[_ngrams(words(r), n) for n in range(1, 5)] for r in references[i]] for i in ids}
    df: Counter = Counter()
    for i in ids:
        seen = set()
        for per_ref in ref_counts[i]:
            for counts in per_ref:
                seen.update(counts)
        df.update(seen)
    log_n = math.log(float(len(ids)))

    def vector(counts_by_n):
        vec, norms = [], []
        for counts in counts_by_n:
            v = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in counts.items()}
            vec.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vec, norms

    total = 0.0
    for i in ids:
        hyp_tokens = words(predictions.get(i, ""))
        hyp_vec, hyp_norm = vector([_ngrams(hyp_tokens, n) for n in range(1, 5)])
        scores = []
        for r, per_ref in zip(references[i], ref_counts[i]):
            ref_vec, ref_norm = vector(per_ref)
            delta = len(hyp_tokens) - len(words(r))
            sims = []
            for n in range(4):
                val = sum(min(hyp_vec[n][g], ref_vec[n][g]) * ref_vec[n][g] for g in hyp_vec[n] if g in ref_vec[n])
                if hyp_norm[n] and ref_norm[n]:
                    val /= hyp_norm[n] * ref_norm[n]
                else:
                    val = 0.0
                sims.append(val * math.exp(-(delta ** 2) / (2 * sigma ** 2)))
            scores.append(sum(sims) / 4)
        total += 10.0 * sum(scores) / len(scores)
    return total / len(ids)


# ---- BLEU-4 --------------------------------------------------------------------------------------
def bleu4(predictions: dict, references: dict) -> float:
    """Corpus BLEU-4: clipped n-gram precisions, closest-reference brevity penalty."""
    matched, possible = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for i, refs in references.items():
        hyp = words(predictions.get(i, ""))
        ref_tokens = [words(r) for r in refs]
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in ref_tokens)[1] if ref_tokens else 0
        for n in range(1, 5):
            counts = _ngrams(hyp, n)
            best: Counter = Counter()
            for r in ref_tokens:
                best |= _ngrams(r, n)
            matched[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            possible[n - 1] += max(0, len(hyp) - n + 1)
    if hyp_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / p) for m, p in zip(matched, possible)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


# ---- fact F1 -------------------------------------------------------------------------------------
def fact_counts(caption: str, ref_facts: list[str], ref_modalities: list[str]) -> dict:
    """Per-modality (true positives, predicted, reference) counts for one clip, plus "all"."""
    from operators.synth.grammar import normalize_clause

    predicted = list(dict.fromkeys(split_clauses(caption)))  # repeated clauses count once
    reference = {normalize_clause(f): m for f, m in zip(ref_facts, ref_modalities)}
    counts = {m: [0, 0, 0] for m in (*MODALITIES, "all")}
    for clause in predicted:
        modality = fact_modality(clause)
        hit = clause in reference
        counts["all"][0] += hit
        counts["all"][1] += 1
        if modality is not None:
            counts[modality][0] += hit and reference[clause] == modality
            counts[modality][1] += 1
    for modality in reference.values():
        counts["all"][2] += 1
        counts[modality][2] += 1
    return counts


def _f1(tp: int, predicted: int, reference: int) -> float:
    return 2 * tp / (predicted + reference) if predicted + reference else 1.0


def fact_f1(caption: str, ref_facts: list[str], ref_modalities: list[str]) -> dict:
    counts = fact_counts(caption, ref_facts, ref_modalities)
    return {key: _f1(*c) for key, c in counts.items()}


def corpus_fact_f1(predictions: dict, facts: dict, modalities: dict) -> dict:
    """Micro-averaged fact F1 over the corpus: {"fact_f1", "fact_f1_visual", "fact_f1_audio", "fact_f1_av"}."""
    totals = {m: [0, 0, 0] for m in (*MODALITIES, "all")}
    for i in facts:
        for key, c in fact_counts(predictions.get(i, ""), facts[i], modalities[i]).items():
            totals[key] = [a + b for a, b in zip(totals[key], c)]
    out = {"fact_f1": _f1(*totals["all"])}
    out.update({f"fact_f1_{m}": _f1(*totals[m]) for m in MODALITIES})
    return out


def paired_f1_difference(counts_a, counts_b, resamples: int = 2000, seed: int = 0) -> dict:
    """Micro fact F1 of A minus that of B over the same clips, with a 95% paired bootstrap interval.

    counts_*: per clip (true positives, predicted, reference), clips in the same order (fact_counts'
    "all"). Clips are resampled with replacement, the same draw for A and B, so the interval reflects
    which clips the split happens to hold, not only how the two methods differ on them."""
    import numpy as np

    a, b = np.asarray(counts_a, dtype=float), np.asarray(counts_b, dtype=float)
    f1 = lambda c: 2 * c[..., 0] / np.maximum(c[..., 1] + c[..., 2], 1)  # noqa: E731
    draws = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    diffs = f1(a[draws].sum(1)) - f1(b[draws].sum(1))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"diff": float(f1(a.sum(0)) - f1(b.sum(0))), "low": float(low), "high": float(high),
            "share_a_better": float((diffs > 0).mean())}


def _objects(clauses) -> list[tuple[str, str, str, str]]:
    """(size, colour, shape, motion phrase) of every visual clause, in order."""
    out = []
    for clause in clauses:
        if fact_modality(clause) == VISUAL:
            _, size, colour, shape, *motion = clause.split()
            out.append((size, colour, shape, " ".join(motion)))
    return out


def visual_attributes(predictions: dict, facts: dict) -> dict:
    """Which attribute makes visual facts wrong. Each reference object (visual fact) is matched to the
    first predicted object of its colour; "colour_found" is the share of reference objects matched, and
    size/shape/motion the share of matched ones whose attribute is right ({} without visual facts)."""
    from operators.synth.grammar import normalize_clause

    found = right_size = right_shape = right_motion = total = 0
    for i, ref_facts in facts.items():
        predicted = _objects(split_clauses(predictions.get(i, "")))
        for size, colour, shape, motion in _objects(normalize_clause(f) for f in ref_facts):
            total += 1
            match = next((p for p in predicted if p[1] == colour), None)
            if match is None:
                continue
            found += 1
            right_size += match[0] == size
            right_shape += match[2] == shape
            right_motion += match[3] == motion
    if not total:
        return {}
    share = lambda n: n / found if found else 0.0  # noqa: E731
    return {"objects": total, "colour_found": found / total, "size": share(right_size),
            "shape": share(right_shape), "motion": share(right_motion)}
