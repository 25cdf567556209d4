"""The main job: `python -m pipelines.caption --input URI --output URI [...]` (also `avsieve caption`).

list inputs (with their versions) -> skip what the output already holds for this configuration
(operators/resume.py) -> manifest.parquet of the rest -> read_parquet -> prepare (decode + tokenize, CPU
tasks) -> caption (actor pool, model loaded once per actor) -> write parts -> summary + metrics JSON.

Rerunning the same command is always safe: after a crash or kill it does only the missing windows; on
a schedule it picks up new and changed inputs and retries transient errors. `--recompute` redoes all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import posixpath
import secrets
import sys
import time

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.caption import CaptionSettings
from operators.engines import window_form
from operators.models.fingerprint import model_version
from operators.models.qwen2_5_omni import load_model_config, model_card, resolve_model_source
from operators.prepare import PrepareSettings
from operators.resume import JOB_MANIFEST_SCHEMA, plan_run
from operators.pruning import make_pruner
from operators.sink import read_output, sweep_temp_parts
from operators.sources import scan_inputs
from pipelines.config import CaptionConfig, load_config
from pipelines.metrics import summarize

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
        max_prompt_tokens=config.max_prompt_tokens or _prompt_token_limit(source, config.max_new_tokens),
        decode_timeout_s=config.decode_timeout_s,
        window_form=window_form(config.resolved_engine(), config.pruner),
    )


@functools.lru_cache(maxsize=4)
def _text_config(source: str):
    """The model's LLM config (read once per source; the driver needs its depth and context length)."""
    return load_model_config(source).get_text_config()


def _prompt_token_limit(source: str, max_new_tokens: int) -> int | None:
    """The model's context minus the caption's tokens: longer prompts are resampled in prepare."""
    limit = getattr(_text_config(source), "max_position_embeddings", None)
    return limit - max_new_tokens if limit else None


def calibrate_budget(config: CaptionConfig, rows: list[dict], prepare: PrepareSettings) -> float | None:
    """Adaptive budget: fit the reference content level on a deterministic sample of the run's windows,
    so the run's mean retention meets --retention. Returns None when there is nothing to calibrate. The
    sample's windows are prepared as parallel Ray tasks (pipelines/ray_adapter.py).

    The value is stored under _avsieve/ and reused by later runs of the same configuration, so resumed
    and scheduled runs prune exactly like the run that wrote the earlier rows."""
    if config.budget != "adaptive" or config.budget_c_ref is not None or config.pruner == "none":
        return config.budget_c_ref
    path = _bookkeeping(config.output, f"calibration-{config.config_hash()}.json")
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.exists(fs_path):
        with fs.open(fs_path, "r") as f:
            return json.load(f)["budget_c_ref"]
    if not rows:
        return None
    c_ref = _calibrate(config, rows, prepare)
    fs.makedirs(posixpath.dirname(fs_path), exist_ok=True)
    with fs.open(fs_path, "w") as f:
        json.dump({"budget_c_ref": c_ref}, f)
    return c_ref


def _calibrate(config: CaptionConfig, rows: list[dict], prepare: PrepareSettings) -> float | None:
    from operators.pruning import calibrated_c_ref, resolve_retention
    from pipelines import ray_adapter

    layers = _text_config(prepare.model).num_hidden_layers
    retention = resolve_retention(config.pruner, config.retention, layers)
    if retention >= 1.0:
        return None
    ordered = sorted(rows, key=lambda r: r["source_id"])  # hash order: an unbiased, repeatable sample
    signals = ray_adapter.calibration_signals(ordered, dataclasses.replace(prepare, window_form="tensors"),
                                              config.calibration_windows, config.prepare_cpus)
    if not signals:
        return None
    return calibrated_c_ref(config.pruner, retention, signals, layers, config.pruner_weights, prepare.model)


def window_signals(row: dict, prepare: PrepareSettings) -> list:
    """The adaptive budget's content signals of every window of one input (a calibration task)."""
    from operators import tokenize as tok
    from operators.prepare import prepare_windows
    from operators.pruning.content import sample_signals

    return [sample_signals(tok.unpack(w["model_inputs"])) for w in prepare_windows(row, prepare) if w["status"] == "ok"]


def _bookkeeping(output: str, name: str) -> str:
    return posixpath.join(output.rstrip("/"), BOOKKEEPING_DIR, name)


def write_manifest(rows: list[dict], output: str, run_key: str) -> str:
    path = _bookkeeping(output, f"manifest-{run_key}.parquet")
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(posixpath.dirname(fs_path), exist_ok=True)
    with fs.open(fs_path, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=JOB_MANIFEST_SCHEMA), f)
    return path


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def print_report(table: pa.Table, summary: dict, show: int = 20, stream=sys.stdout) -> None:
    # Sort in Arrow and convert only what is shown: the table may hold millions of windows.
    rows = table.sort_by([("uri", "ascending"), ("window_index", "ascending")]).slice(0, show).to_pylist()
    for row in rows:
        name = posixpath.basename(row["uri"] or "?")
        span = f"[{row['start_s'] or 0:.1f}-{row['end_s'] or 0:.1f}s]" if row["start_s"] is not None else ""
        text = row["caption"] if row["status"] == "ok" else f"ERROR ({row['error_kind']}): {row['error']}"
        print(f"{name} {span}: {text}", file=stream)
    if table.num_rows > show:
        print(f"... {table.num_rows - show} more windows", file=stream)
    print(json.dumps({"summary": summary}), file=stream)
    if summary.get("captions_truncated"):
        print(f"warning: {summary['captions_truncated']} captions stopped at --max-new-tokens before the model "
              "ended them (column caption_truncated); raise --max-new-tokens to get them whole", file=stream)


def run(config: CaptionConfig) -> dict:
    from pipelines import ray_adapter

    run_id = new_run_id()
    config_hash = config.config_hash()
    source = resolve_model_source(config.model)
    prepare = preprocess_settings(config, source)
    version = model_version(source)
    # Fail fast: trained weights missing, or trained for another version of the captioner.
    make_pruner(config.pruner, 0.5, weights=config.pruner_weights, model_source=source, model_version=version,
                allow_foreign_weights=config.allow_foreign_pruner_weights)
    rows, not_taken = scan_inputs(config.input, config.limit, config.prompt)
    start = time.perf_counter()
    sweep_temp_parts(config.output)
    plan = plan_run(rows, config.output, config_hash, recompute=config.recompute, retry_errors=config.retry_errors,
                    model_version=version)
    if plan.todo:  # Ray starts only when there is work: calibration tasks and the job
        ray_adapter.connect(config.ray_address)
    c_ref = calibrate_budget(config, rows if plan.todo else [], prepare)  # [] = the stored value, if any
    caption = CaptionSettings(
        model=source, device=config.device, dtype=config.dtype, attn_implementation=config.attn_implementation,
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=config.seed,
        num_beams=config.num_beams, no_repeat_sentences=config.no_repeat_sentences,
        pruner=config.pruner, pruner_weights=config.pruner_weights, budget=config.budget,
        allow_foreign_pruner_weights=config.allow_foreign_pruner_weights,
        retention=config.retention, budget_c_ref=c_ref, config_hash=config_hash, run_id=run_id,
        model_version=version, engine=config.resolved_engine(),
    )
    if plan.todo:
        manifest = write_manifest(plan.todo, config.output, config_hash)
        ray_adapter.run_caption_job(
            manifest, config.output, prepare, caption, batch_size=config.batch_size, actors=config.actors,
            max_actors=config.max_actors, gpus_per_actor=config.gpus_per_actor,
            cpus_per_actor=config.cpus_per_actor, prepare_cpus=config.prepare_cpus, progress=config.progress,
        )
        ray_adapter.remove_journals(config.output, run_id)
    seconds = time.perf_counter() - start
    table = read_output(config.output, config_hash=config_hash)
    ids = pa.array([r["source_id"] for r in rows], pa.string())
    table = table.filter(pc.is_in(table.column("source_id"), ids))
    summary = summarize(table, seconds, run_id, plan)
    summary.update(inputs=len(rows), config_hash=config_hash, run_id=run_id, output=config.output,
                   budget_c_ref=c_ref, model_version=version, engine=config.resolved_engine(),
                   not_taken=not_taken.as_dict())
    with fsspec.open(_bookkeeping(config.output, f"metrics-{config_hash}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_report(table, summary)
    if not_taken.line():
        print(not_taken.line())
    return summary


def main(argv: list[str] | None = None) -> int:
    run(load_config(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
