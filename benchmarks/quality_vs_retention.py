"""Caption quality against retention for every pruning method and budget, on a synthetic test split.

Windows are decoded and tokenized once with the caption job's prepare stage; each (method, budget,
retention) then captions all of them with the same Captioner the Ray actors use and is scored with the
world's fact F1 and CIDEr-D. Prints a Markdown table and writes JSON + a PNG plot.

    python -m pipelines.synthesize --out out/test --n 100 --seed 12345 --split test
    python -m benchmarks.quality_vs_retention --clips out/test --out out/quality
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RETENTIONS = (1.0, 0.6, 0.4, 0.2, 0.1)
METHODS = ("random", "uniform", "fastv", "fastav", "echoingpixels", "avex")


def tokenized_windows(clips: str, model: str, limit: int | None = None) -> list[dict]:
    from operators.models.qwen2_5_omni import model_card
    from operators.prepare import PrepareSettings, prepare_windows
    from operators.sources import list_inputs
    from pipelines.config import DEFAULT_PROMPT

    pre = model_card(model).get("preprocess", {})
    settings = PrepareSettings(model=model, prompt=DEFAULT_PROMPT, max_pixels=pre.get("max_pixels"),
                               min_pixels=pre.get("min_pixels"))
    rows = []
    for source in list_inputs(clips, limit):
        rows.extend(w for w in prepare_windows(source, settings) if w["status"] == "ok")
    return rows


def run_setting(captioner, rows, batch_size: int) -> tuple[dict, float]:
    captions, t0 = {}, time.perf_counter()
    for i in range(0, len(rows), batch_size):
        for out in captioner.caption_rows(rows[i:i + batch_size]):
            captions[Path(out["uri"]).name] = out
    return captions, time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", required=True)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--out", default="out/quality")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--retentions", default=",".join(map(str, RETENTIONS)))
    parser.add_argument("--budgets", default="fixed,adaptive")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--limit", type=int, default=None, help="first N clips of the split (sorted by name)")
    args = parser.parse_args(argv)

    from operators.caption import Captioner, CaptionSettings
    from operators.metrics import cider_d, corpus_fact_f1
    from operators.models.qwen2_5_omni import resolve_model_source
    from operators.models.qwen2_5_omni import load_model_config
    from operators.pruning import calibrated_c_ref
    from operators.pruning.content import sample_signals
    from operators.tokenize import unpack

    model = resolve_model_source(args.model)
    layers = load_model_config(model).get_text_config().num_hidden_layers
    refs = {json.loads(x)["file"]: json.loads(x) for x in (Path(args.clips) / "references.jsonl").open()}
    rows = tokenized_windows(args.clips, model, args.limit)
    names = {Path(r["uri"]).name for r in rows}
    refs = {k: v for k, v in refs.items() if k in names}
    signals = [sample_signals(unpack(r["model_inputs"])) for r in rows]
    settings = [("none", "fixed", 1.0)] + [
        (m, b, r) for m in args.methods.split(",") for b in args.budgets.split(",")
        for r in map(float, args.retentions.split(",")) if r < 1.0]
    results, base = [], None
    for method, budget, retention in settings:
        c_ref = calibrated_c_ref(method, retention, signals, layers, model_source=model) \
            if budget == "adaptive" else None
        captioner = Captioner(CaptionSettings(model=model, pruner=method, budget=budget, retention=retention,
                                              budget_c_ref=c_ref, max_new_tokens=args.max_new_tokens))
        captions, seconds = run_setting(captioner, rows, args.batch_size)
        preds = {k: captions[k]["caption"] if k in captions else "" for k in refs}
        scores = corpus_fact_f1(preds, {k: v["facts"] for k, v in refs.items()},
                                {k: v["fact_modalities"] for k, v in refs.items()})
        kept = sum(c["video_tokens_kept"] + c["audio_tokens_kept"] for c in captions.values())
        total = sum(c["video_tokens"] + c["audio_tokens"] for c in captions.values())
        row = {"method": method, "budget": budget, "retention": retention, "effective_retention": kept / total,
               "cider": cider_d(preds, {k: [v["caption"]] for k, v in refs.items()}), **scores,
               "prefill_ms_per_window": sum(c["prefill_ms"] for c in captions.values()) / len(captions),
               "flops_per_window": sum(c["prefill_flops"] for c in captions.values()) / len(captions),
               "n": len(preds),
               "seconds": seconds}
        base = base or row
        row["fact_f1_rel"] = row["fact_f1"] / base["fact_f1"] if base["fact_f1"] else 0.0
        row["flops_rel"] = row["flops_per_window"] / base["flops_per_window"]
        results.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    print("\n| method | budget | retention | effective | fact F1 | rel. to none | visual | audio | av | CIDEr-D | "
          "prefill FLOPs rel. | prefill ms/window |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['budget']} | {r['retention']} | {r['effective_retention']:.3f} | "
              f"{r['fact_f1']:.3f} | {r['fact_f1_rel']:.3f} | {r['fact_f1_visual']:.3f} | {r['fact_f1_audio']:.3f} | "
              f"{r['fact_f1_av']:.3f} | {r['cider']:.2f} | {r['flops_rel']:.3f} | {r['prefill_ms_per_window']:.1f} |")
    plot(results, out / "quality.png")
    return 0


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    base = results[0]
    for k, method in enumerate(dict.fromkeys(r["method"] for r in results[1:])):
        for budget, style in (("fixed", "-o"), ("adaptive", "--s")):
            pts = sorted([(1.0, base["fact_f1"])] + [(r["retention"], r["fact_f1"]) for r in results
                                                     if r["method"] == method and r["budget"] == budget])
            if len(pts) > 1:  # one colour per method, line style per budget
                ax.plot(*zip(*pts), style, color=f"C{k}", label=f"{method} ({budget})")
    ax.set_xlabel("retention (compute budget)")
    ax.set_ylabel("fact F1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
