"""Score a caption job's output against the synthetic world's references.

    python -m pipelines.evaluate --predictions OUTPUT_URI --references DIR/references.jsonl [--report PREFIX]

Joins output rows to references by file name (basename of `uri`); clips with several windows get their
window captions concatenated in window order. Error rows and clips with no output row count as empty
captions, so they lower the scores instead of disappearing. Prints one JSON object and writes
PREFIX.json (with per-clip scores) and PREFIX.png next to the predictions (default PREFIX:
OUTPUT/_avsieve/eval-<config hash>).
"""

from __future__ import annotations

import argparse
import json
import posixpath

import fsspec

from operators.metrics import MODALITIES, bleu4, cider_d, corpus_fact_f1, fact_counts, fact_f1, visual_attributes
from operators.sink import read_output


def load_references(path: str) -> dict[str, dict]:
    with fsspec.open(path, "r") as f:
        refs = [json.loads(line) for line in f if line.strip()]
    return {ref["file"]: ref for ref in refs}


def collect_predictions(predictions_uri: str, config_hash: str | None = None) -> tuple[dict, dict, set]:
    """file -> caption (windows joined), file -> row metadata, files with an error row."""
    table = read_output(predictions_uri)
    rows = table.to_pylist()
    if config_hash:
        rows = [r for r in rows if r["config_hash"] == config_hash]
    hashes = {r["config_hash"] for r in rows}
    if len(hashes) > 1:
        raise ValueError(f"{predictions_uri} holds runs of several configurations {sorted(hashes)}; "
                         "pass --config-hash")
    by_file: dict[str, list[dict]] = {}
    for row in rows:
        by_file.setdefault(posixpath.basename(row["uri"] or ""), []).append(row)
    captions, meta, errors = {}, {}, set()
    for name, group in by_file.items():
        group.sort(key=lambda r: r["window_index"] or 0)
        if any(r["status"] != "ok" for r in group):
            errors.add(name)
        captions[name] = " ".join(r["caption"] or "" for r in group if r["status"] == "ok")
        meta[name] = group[0]
    return captions, meta, errors


def evaluate(predictions_uri: str, references_path: str, report_prefix: str | None = None,
             config_hash: str | None = None) -> dict:
    refs = load_references(references_path)
    captions, meta, errors = collect_predictions(predictions_uri, config_hash)
    preds = {name: captions.get(name, "") for name in refs}
    result = {
        "cider": cider_d(preds, {k: [v["caption"]] for k, v in refs.items()}),
        "bleu4": bleu4(preds, {k: [v["caption"]] for k, v in refs.items()}),
        **corpus_fact_f1(preds, {k: v["facts"] for k, v in refs.items()},
                         {k: v["fact_modalities"] for k, v in refs.items()}),
        "visual_attributes": visual_attributes(preds, {k: v["facts"] for k, v in refs.items()}),
        # What captions state, by modality, right or wrong: on a split of sound alone, any visual or
        # audio-visual fact is a picture the model made up.
        "stated_facts_per_clip": stated_facts_per_clip(preds, refs),
        "n": len(refs),
        "n_missing": sum(1 for k in refs if k not in captions),
        "n_error": len(errors & set(refs)),
    }
    any_row = next(iter(meta.values()), {})
    result.update({k: any_row.get(k) for k in ("model", "pruner", "budget", "retention_target", "config_hash")})
    per_clip = {k: {"prediction": preds[k], "reference": v["caption"],
                    **fact_f1(preds[k], v["facts"], v["fact_modalities"])} for k, v in refs.items()}
    prefix = report_prefix or posixpath.join(predictions_uri.rstrip("/"), "_avsieve",
                                             f"eval-{result['config_hash'] or 'none'}")
    write_report(prefix, result, per_clip)
    return result


def stated_facts_per_clip(preds: dict, refs: dict) -> dict:
    """Mean number of facts each caption states, per modality (fact_counts' predicted counts)."""
    totals = dict.fromkeys(MODALITIES, 0)
    for name, ref in refs.items():
        counts = fact_counts(preds[name], ref["facts"], ref["fact_modalities"])
        for modality in MODALITIES:
            totals[modality] += counts[modality][1]
    return {m: n / max(len(refs), 1) for m, n in totals.items()}


def write_report(prefix: str, result: dict, per_clip: dict) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs, path = fsspec.core.url_to_fs(prefix)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path + ".json", "w") as f:
        json.dump({"summary": result, "clips": per_clip}, f, indent=1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    keys = ["fact_f1", "fact_f1_visual", "fact_f1_audio", "fact_f1_av"]
    left.bar([k.replace("fact_f1_", "").replace("fact_f1", "all") for k in keys], [result[k] for k in keys])
    left.set_ylim(0, 1)
    left.set_title(f"fact F1 (CIDEr-D {result['cider']:.2f}, n={result['n']})")
    right.hist([c["all"] for c in per_clip.values()], bins=20, range=(0, 1))
    right.set_title("per-clip fact F1")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with fs.open(path + ".png", "wb") as f:
        f.write(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avsieve evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--references", required=True)
    parser.add_argument("--report", help="prefix for the .json and .png report")
    parser.add_argument("--config-hash", help="score only rows of this configuration")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate(args.predictions, args.references, args.report, args.config_hash)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
