"""What does AVEX's exchange training add? The trained policy against untrained controls, same selection.

    python -m benchmarks.avex_controls --clips DIR [--limit N] [--retentions 0.4,0.2,0.1] [--seeds 3]

Every variant keeps tokens with AVEX's own rule (each modality its proportional share, the best-scored
token of each stretch of its stream: `AvexPruner.keep_from_scores`), so they differ only in the scores:

- trained: the policy shipped with the model (exchange-aware REINFORCE training);
- untrained: the same network freshly initialised (one row per --seeds seed);
- novelty: no learning at all, the distance of each token's embedding from its modality's mean.

With `--weights a=PATH,b=PATH` it compares those trained policies instead (e.g. two training objectives),
each against the first.

Fixed budget, greedy, the caption stage's own Captioner on windows from its own prepare stage. Prints
fact F1 per variant and retention and, for each control, the trained policy's lead with a 95% paired
bootstrap interval over clips (operators.metrics.paired_f1_difference).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn


class NoveltyScore(nn.Module):
    """Untrained score: how far a token's embedding lies from the mean of its modality's tokens."""

    method = "avex"
    settings: dict = {}

    def forward(self, hidden, position_ids, valid, modality, rotary_emb=None) -> torch.Tensor:
        scores = torch.zeros(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
        h = hidden.float()
        for code in modality.unique().tolist():
            mask = (modality == code) & valid
            count = mask.sum(1, keepdim=True).clamp(min=1)
            mean = (h * mask[..., None]).sum(1, keepdim=True) / count[..., None]
            scores = torch.where(mask, (h - mean).norm(dim=-1), scores)
        return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", required=True)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--retentions", default="0.4,0.2,0.1")
    parser.add_argument("--seeds", type=int, default=3, help="initialisations of the untrained network")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", help="write the rows here as JSON")
    parser.add_argument("--weights", help="instead of the controls, compare AVEX weight files, name=path,...: "
                                          "the first is the one the others are measured against")
    args = parser.parse_args(argv)
    weights = [item.split("=", 1) for item in args.weights.split(",")] if args.weights else []

    from benchmarks.quality_vs_retention import run_setting, tokenized_windows
    from operators.caption import Captioner, CaptionSettings
    from operators.metrics import corpus_fact_f1, fact_counts, paired_f1_difference
    from operators.models.qwen2_5_omni import resolve_model_source
    from operators.pruning.budget import FixedBudget
    from operators.pruning.learned import AvexPruner, PolicyNet

    model = resolve_model_source(args.model)
    refs = {json.loads(x)["file"]: json.loads(x) for x in (Path(args.clips) / "references.jsonl").open()}
    rows = tokenized_windows(args.clips, model, args.limit)
    names = sorted({Path(r["uri"]).name for r in rows} & set(refs))
    captioner = Captioner(CaptionSettings(model=model, pruner="avex", retention=0.4,
                                          max_new_tokens=args.max_new_tokens))
    hidden = captioner.engine.thinker.model.config.get_text_config().hidden_size

    def variants(retention: float):
        budget = FixedBudget(retention)
        if weights:
            for name, path in weights:
                yield name, AvexPruner(budget, weights=path, model_source=model)
            return
        yield "trained", AvexPruner(budget, model_source=model)
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            yield f"untrained (seed {seed})", AvexPruner(budget, net=PolicyNet(hidden).eval())
        yield "novelty", AvexPruner(budget, net=NoveltyScore())

    results = []
    for retention in map(float, args.retentions.split(",")):
        counts = {}
        for name, hook in variants(retention):
            captioner.engine.hook = hook
            captions, seconds = run_setting(captioner, rows, args.batch_size)
            preds = {n: captions[n]["caption"] if n in captions else "" for n in names}
            score = corpus_fact_f1(preds, {n: refs[n]["facts"] for n in names},
                                   {n: refs[n]["fact_modalities"] for n in names})
            counts[name] = [fact_counts(preds[n], refs[n]["facts"], refs[n]["fact_modalities"])["all"] for n in names]
            row = {"variant": name, "retention": retention, **score, "n": len(names), "seconds": seconds}
            reference = next(iter(counts))  # the first variant: the shipped policy, or the first --weights
            if name != reference:
                row["trained_lead"] = paired_f1_difference(counts[reference], counts[name])
            results.append(row)
            print(json.dumps(row), flush=True)
    print("\n| retention | variant | fact F1 | visual | audio | audio-visual | first variant minus this (95% interval) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        lead = r.get("trained_lead")
        text = f"{lead['diff']:+.3f} [{lead['low']:+.3f}, {lead['high']:+.3f}]" if lead else ""
        print(f"| {r['retention']} | {r['variant']} | {r['fact_f1']:.3f} | {r['fact_f1_visual']:.3f} | "
              f"{r['fact_f1_audio']:.3f} | {r['fact_f1_av']:.3f} | {text} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
