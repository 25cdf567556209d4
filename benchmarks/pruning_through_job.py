"""Pruning quality through the full caption job (Ray Data, real mp4 decoding), relative to no pruning.

Every setting runs `pipelines.caption` into the same output folder (settings differ in their config
hash, so they sit side by side) and is scored with `pipelines.evaluate`. Prints a Markdown table, then
each trained method's fact F1 margin over random and uniform at the same retention with a 95% paired
bootstrap interval over clips, and writes JSON next to the output.

    python -m benchmarks.pruning_through_job --clips out/test --out out/test-pruning
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAINED, BASELINES = ("avex", "echoingpixels"), ("random", "uniform")
SETTINGS = "none:1.0,avex:0.4,avex:0.2,avex:0.1,echoingpixels:0.4,echoingpixels:0.2,echoingpixels:0.1," \
           "random:0.2,random:0.1,uniform:0.2,uniform:0.1"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", required=True)
    parser.add_argument("--out", default="out/test-pruning")
    parser.add_argument("--settings", default=SETTINGS, help="method:retention,...")
    parser.add_argument("--budget", default="fixed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args(argv)

    from pipelines import caption
    from pipelines.config import CaptionConfig
    from pipelines.evaluate import evaluate

    refs = str(Path(args.clips) / "references.jsonl")
    results = []
    for item in args.settings.split(","):
        method, retention = item.split(":")
        config = CaptionConfig(input=args.clips, output=args.out, pruner=method, budget=args.budget,
                               retention=float(retention), max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, progress=False)
        summary = caption.run(config)
        scores = evaluate(args.out, refs, config_hash=summary["config_hash"])
        row = {"method": method, "budget": args.budget, "retention": float(retention),
               **{k: scores[k] for k in ("fact_f1", "fact_f1_visual", "fact_f1_audio", "fact_f1_av", "cider",
                                         "n", "n_error", "n_missing")},
               "windows_per_s": summary.get("windows_per_s"), "summary": summary,
               "clip_counts": clip_counts(args.out, refs, summary["config_hash"])}
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("summary", "clip_counts")}), flush=True)
    base = next((r for r in results if r["method"] == "none"), None)
    for r in results:
        r["fact_f1_rel"] = r["fact_f1"] / base["fact_f1"] if base and base["fact_f1"] else None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pruning_through_job.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n| method | budget | retention | n | fact F1 | rel. to none | visual | audio | av | CIDEr-D | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rel = f"{r['fact_f1_rel']:.3f}" if r["fact_f1_rel"] is not None else "-"
        print(f"| {r['method']} | {r['budget']} | {r['retention']} | {r['n']} | {r['fact_f1']:.3f} | {rel} | "
              f"{r['fact_f1_visual']:.3f} | {r['fact_f1_audio']:.3f} | {r['fact_f1_av']:.3f} | {r['cider']:.3f} | "
              f"{r['n_error'] + r['n_missing']} |")
    print_margins(results)
    return 0


def clip_counts(output: str, references: str, config_hash: str) -> list[list[int]]:
    """Per reference clip, in file order: (true positives, predicted, reference) over all facts."""
    from operators.metrics import fact_counts
    from pipelines.evaluate import collect_predictions, load_references

    refs = load_references(references)
    captions, _, _ = collect_predictions(output, config_hash)
    return [fact_counts(captions.get(name, ""), ref["facts"], ref["fact_modalities"])["all"]
            for name, ref in sorted(refs.items())]


def print_margins(results: list[dict]) -> None:
    from operators.metrics import paired_f1_difference

    rows = []
    for r in results:
        for base in results:
            if r["method"] in TRAINED and base["method"] in BASELINES and base["retention"] == r["retention"]:
                m = paired_f1_difference(r["clip_counts"], base["clip_counts"])
                rows.append(f"| {r['method']} − {base['method']} | {r['retention']} | {m['diff']:+.4f} | "
                            f"[{m['low']:+.4f}, {m['high']:+.4f}] | {m['share_a_better']:.3f} |")
    if rows:
        print("\n| margin | retention | fact F1 difference | 95% interval (paired bootstrap over clips) | "
              "share of resamples ahead |")
        print("|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    raise SystemExit(main())
