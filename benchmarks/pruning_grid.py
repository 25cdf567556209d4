"""Pruning on both engines, side by side: `python -m benchmarks.engines --methods ...` runs this.

For every pre-LLM method, budget and retention, on the same prepared windows and in one process:

- vLLM: one engine per method (the model class runs the method; plans come from the actor), every
  window in one generate call, with a KV cache of the same size for every setting (`--kv-windows`
  unpruned windows' worth of blocks, num_gpu_blocks_override). Measures windows/s, generated tokens/s,
  KV-cache tokens per window (prompt as the LLM holds it + generated), the most windows vLLM ran at
  once (its scheduler's running list, polled), the compute share kept, and fact F1.
- HF: the same at --hf-retentions, in batches of --batch-size; captions compared with vLLM's.

Unpruned rows (retention 1.0) are each engine's production path: vLLM's own processor on the compact
window for vLLM, the HF engine without a hook.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import statistics
import threading
import time
from pathlib import Path

from benchmarks.engines import MEDIA, prepared, timed
from operators import tokenize as tok
from operators.caption import CaptionSettings
from operators.metrics import corpus_fact_f1
from operators.models.qwen2_5_omni import load_model_config, model_card, resolve_model_source
from operators.prepare import PrepareSettings
from pipelines.config import DEFAULT_PROMPT


class PeakRunning:
    """The most requests vLLM's scheduler ran at once while the block was active (in-process engine)."""

    def __init__(self, llm):
        self.scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, len(self.scheduler.running))
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _summary(rows: list[dict], seconds: float, names: list[str], refs: dict) -> dict:
    captions: dict[str, list[str]] = {}
    for name, row in zip(names, rows):
        captions.setdefault(name, []).append(row["caption"])
    preds = {k: " ".join(captions.get(k, [])) for k in refs}
    f1 = corpus_fact_f1(preds, {k: v["facts"] for k, v in refs.items()},
                        {k: v["fact_modalities"] for k, v in refs.items()})
    media = sum(r["video_tokens"] + r["audio_tokens"] for r in rows)
    kept = sum(r["video_tokens_kept"] + r["audio_tokens_kept"] for r in rows)
    kv = [r["text_tokens"] + r["video_tokens_kept"] + r["audio_tokens_kept"] + r["output_tokens"] for r in rows]
    return {"seconds": seconds, "windows_per_s": len(rows) / seconds,
            "tokens_per_s": sum(r["output_tokens"] for r in rows) / seconds,
            "kept_share": kept / media, "kv_tokens_per_window": statistics.median(kv),
            "fact_f1": f1["fact_f1"], "visual_f1": f1["fact_f1_visual"], "audio_f1": f1["fact_f1_audio"],
            "captions": [r["caption"] for r in rows]}


def run_grid(args) -> int:
    from operators.engines.hf import HfCaptioner
    from operators.engines.vllm import VllmCaptioner
    from operators.pruning import calibrated_c_ref, make_pruner
    from operators.pruning.content import sample_signals

    source = resolve_model_source(None)
    files = sorted(p for d in args.clips for p in Path(d).iterdir() if p.suffix in MEDIA)
    refs = {}
    for line in Path(args.references).read_text().splitlines():
        if line.strip():
            ref = json.loads(line)
            refs[ref["file"]] = ref
    pre = PrepareSettings(model=source, prompt=DEFAULT_PROMPT, **model_card(source)["preprocess"])
    names: list[str] = []
    blobs = prepared(files, pre, names)
    compact = prepared(files, dataclasses.replace(pre, window_form="compact"))
    signals = [sample_signals(tok.unpack(b)) for b in blobs[:64]]  # what the job calibrates on
    layers = load_model_config(source).get_text_config().num_hidden_layers
    settings = CaptionSettings(model=source, device="cpu", dtype="float32", max_new_tokens=args.max_new_tokens)
    methods = args.methods.split(",")
    budgets = args.budgets.split(",")
    retentions = [float(r) for r in args.retentions.split(",") if float(r) < 1.0]
    hf_retentions = {float(r) for r in args.hf_retentions.split(",")}

    # One KV cache size for every vLLM setting: --kv-windows unpruned windows at their median length.
    block = 16
    unpruned = statistics.median(int(tok.unpack(b)["input_ids"].numel()) for b in blobs)
    blocks = args.kv_windows * math.ceil((unpruned + args.max_new_tokens) / block)
    kv_args = {"num_gpu_blocks_override": blocks, "block_size": block}

    def pruner(method, budget, retention):
        c_ref = calibrated_c_ref(method, retention, signals, layers) if budget == "adaptive" else None
        return make_pruner(method, retention, budget, c_ref, model_source=source)

    results = []

    def record(engine, method, budget, retention, rows, seconds, peak=None):
        entry = {"engine": engine, "method": method, "budget": budget, "retention": retention,
                 "peak_windows_in_flight": peak, **_summary(rows, seconds, names, refs)}
        results.append(entry)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()
                          if k != "captions"}), flush=True)

    # vLLM, unpruned (the production path), then one engine per method.
    engine = VllmCaptioner(settings, engine_args=kv_args)
    with PeakRunning(engine.llm) as peak:
        rows, seconds = timed(engine.caption, compact, len(compact))
    record("vllm", "none", "fixed", 1.0, rows, seconds, peak.peak)
    del engine
    gc.collect()
    for method in methods:
        engine = VllmCaptioner(dataclasses.replace(settings, pruner=method, retention=retentions[0]),
                               engine_args=kv_args)
        for budget in budgets:
            for retention in retentions:
                engine.pruner = pruner(method, budget, retention)
                engine.retention = retention
                with PeakRunning(engine.llm) as peak:
                    rows, seconds = timed(engine.caption, blobs, len(blobs))
                record("vllm", method, budget, retention, rows, seconds, peak.peak)
        del engine
        gc.collect()

    # HF at the chosen retentions.
    hf = HfCaptioner(settings)
    if 1.0 in hf_retentions:
        rows, seconds = timed(hf.caption, blobs, args.batch_size)
        record("hf", "none", "fixed", 1.0, rows, seconds)
    for method in methods:
        for budget in budgets:
            for retention in sorted(hf_retentions & set(retentions), reverse=True):
                hf.hook = pruner(method, budget, retention)
                rows, seconds = timed(hf.caption, blobs, args.batch_size)
                record("hf", method, budget, retention, rows, seconds)

    # Captions identical across engines, where both ran.
    by_key = {(r["engine"], r["method"], r["budget"], r["retention"]): r for r in results}
    for r in results:
        twin = by_key.get(("vllm", r["method"], r["budget"], r["retention"]))
        if r["engine"] == "hf" and twin:
            r["identical_to_vllm"] = sum(a == b for a, b in zip(r["captions"], twin["captions"]))

    print(f"\n{len(blobs)} windows from {len(files)} clips, float32, greedy, up to {args.max_new_tokens} tokens; "
          f"vLLM KV cache {blocks} blocks of {block} tokens ({args.kv_windows} unpruned windows) for every setting")
    print("| engine | method | budget | retention | kept share | windows/s | tokens/s | KV tokens/window | "
          "windows at once | fact F1 | visual | audio | identical to vLLM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['engine']} | {r['method']} | {r['budget']} | {r['retention']} | {r['kept_share']:.3f} | "
              f"{r['windows_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['kv_tokens_per_window']:.0f} | "
              f"{r['peak_windows_in_flight'] if r['peak_windows_in_flight'] is not None else '-'} | "
              f"{r['fact_f1']:.3f} | {r['visual_f1'] or 0:.3f} | {r['audio_f1'] or 0:.3f} | "
              f"{str(r['identical_to_vllm']) + '/' + str(len(blobs)) if 'identical_to_vllm' in r else '-'} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"windows": len(blobs), "kv_blocks": blocks, "block_size": block,
                                              "max_new_tokens": args.max_new_tokens, "results": results}, indent=1))
    return 0
