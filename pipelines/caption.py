"""The main job: `python -m pipelines.caption --input URI --output URI [...]` (also `avsieve caption`).

list inputs -> manifest.parquet -> read_parquet -> prepare (decode + tokenize, CPU tasks)
-> caption (actor pool, model loaded once per actor) -> write_parquet -> summary + metrics JSON.
"""

from __future__ import annotations

import json
import posixpath
import sys
import time

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.caption import CaptionSettings
from operators.models.qwen2_5_omni import model_card, resolve_model_source
from operators.prepare import PrepareSettings
from operators.sink import read_output
from operators.sources import MANIFEST_SCHEMA, list_inputs
from pipelines.config import CaptionConfig, load_config

BOOKKEEPING_DIR = "_avsieve"  # leading underscore: Parquet readers skip it


def preprocess_settings(config: CaptionConfig, source: str) -> PrepareSettings:
    """Flags win; otherwise the model card's recommended preprocessing; otherwise the processor's own."""
    recommended = model_card(source).get("preprocess", {})
    return PrepareSettings(
        model=source,
        prompt=config.prompt,
        fps=config.fps,
        max_frames=config.max_frames,
        max_pixels=config.max_pixels or recommended.get("max_pixels"),
        min_pixels=config.min_pixels or recommended.get("min_pixels"),
        window_s=config.window_s,
    )


def calibrate_budget(config: CaptionConfig, rows: list[dict], prepare: PrepareSettings) -> float | None:
    """Adaptive budget: fit the reference content level on a deterministic sample of the run's windows,
    so the run's mean retention meets --retention. Returns None when there is nothing to calibrate."""
    if config.budget != "adaptive" or config.budget_c_ref is not None or config.pruner == "none":
        return config.budget_c_ref
    from operators import tokenize as tok
    from operators.prepare import prepare_windows
    from operators.pruning import resolve_retention
    from operators.pruning.budget import AdaptiveBudget
    from operators.pruning.content import sample_signals

    retention = resolve_retention(config.pruner, config.retention, _num_layers(prepare.model))
    if retention >= 1.0:
        return None
    signals = []
    for row in sorted(rows, key=lambda r: r["source_id"]):  # hash order: an unbiased, repeatable sample
        for window in prepare_windows(row, prepare):
            if window["status"] == "ok":
                signals.append(sample_signals(tok.unpack(window["model_inputs"])))
        if len(signals) >= config.calibration_windows:
            break
    return AdaptiveBudget(retention).calibrate(signals) if signals else None


def _num_layers(source: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source).get_text_config().num_hidden_layers


def write_manifest(rows: list[dict], output: str, run_key: str) -> str:
    path = posixpath.join(output.rstrip("/"), BOOKKEEPING_DIR, f"manifest-{run_key}.parquet")
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(posixpath.dirname(fs_path), exist_ok=True)
    with fs.open(fs_path, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), f)
    return path


def summarize(table: pa.Table, seconds: float) -> dict:
    status = table.column("status").to_pylist()
    ok = status.count("ok")

    def total(name: str, mask=None) -> int:
        col = table.column(name)
        col = col.filter(mask) if mask is not None else col
        return int(pc.sum(col).as_py() or 0)

    kinds: dict[str, int] = {}
    for kind, st in zip(table.column("error_kind").to_pylist(), status):
        if st == "error":
            kinds[kind or "unknown"] = kinds.get(kind or "unknown", 0) + 1
    return {
        "windows": table.num_rows, "ok": ok, "error": table.num_rows - ok, "errors_by_kind": kinds,
        "clips": len(set(table.column("source_id").to_pylist())),
        "seconds": round(seconds, 2),
        "windows_per_s": round(table.num_rows / seconds, 3) if seconds > 0 else None,
        "video_tokens": total("video_tokens"), "audio_tokens": total("audio_tokens"),
        "video_tokens_kept": total("video_tokens_kept"), "audio_tokens_kept": total("audio_tokens_kept"),
        "output_tokens": total("output_tokens"),
        "decode_ms": round(float(pc.sum(table.column("decode_ms")).as_py() or 0), 1),
        "prefill_ms": round(float(pc.sum(table.column("prefill_ms")).as_py() or 0), 1),
        "generate_ms": round(float(pc.sum(table.column("generate_ms")).as_py() or 0), 1),
    }


def print_report(table: pa.Table, summary: dict, show: int = 20, stream=sys.stdout) -> None:
    rows = sorted(table.to_pylist(), key=lambda r: (r["uri"] or "", r["window_index"] or 0))
    for row in rows[:show]:
        name = posixpath.basename(row["uri"] or "?")
        span = f"[{row['start_s'] or 0:.1f}-{row['end_s'] or 0:.1f}s]" if row["start_s"] is not None else ""
        text = row["caption"] if row["status"] == "ok" else f"ERROR ({row['error_kind']}): {row['error']}"
        print(f"{name} {span}: {text}", file=stream)
    if len(rows) > show:
        print(f"... {len(rows) - show} more windows", file=stream)
    print(json.dumps({"summary": summary}), file=stream)


def run(config: CaptionConfig) -> dict:
    from pipelines import ray_adapter

    source = resolve_model_source(config.model)
    prepare = preprocess_settings(config, source)
    rows = list_inputs(config.input, config.limit, config.prompt)
    start = time.perf_counter()
    c_ref = calibrate_budget(config, rows, prepare) if rows else None
    caption = CaptionSettings(
        model=source, device=config.device, dtype=config.dtype, attn_implementation=config.attn_implementation,
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=config.seed,
        pruner=config.pruner, budget=config.budget, retention=config.retention, budget_c_ref=c_ref,
        config_hash=config.config_hash(),
    )
    if rows:
        manifest = write_manifest(rows, config.output, config.config_hash())
        ray_adapter.connect(config.ray_address)
        ray_adapter.run_caption_job(
            manifest, config.output, prepare, caption, batch_size=config.batch_size, actors=config.actors,
            max_actors=config.max_actors, gpus_per_actor=config.gpus_per_actor,
            cpus_per_actor=config.cpus_per_actor, prepare_cpus=config.prepare_cpus, progress=config.progress,
        )
    seconds = time.perf_counter() - start
    table = read_output(config.output)
    ids = pa.array([r["source_id"] for r in rows], pa.string())
    table = table.filter(pc.and_(pc.is_in(table.column("source_id"), ids),
                                 pc.equal(table.column("config_hash"), config.config_hash())))
    summary = summarize(table, seconds)
    summary.update(inputs=len(rows), config_hash=config.config_hash(), output=config.output, budget_c_ref=c_ref)
    metrics_path = posixpath.join(config.output.rstrip("/"), BOOKKEEPING_DIR,
                                  f"metrics-{config.config_hash()}.json")
    with fsspec.open(metrics_path, "w") as f:
        json.dump(summary, f, indent=1)
    print_report(table, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    run(load_config(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
