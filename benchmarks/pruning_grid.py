"""Pruning on both engines, side by side: `python -m benchmarks.engines --methods ...` runs this.

For every pre-LLM method, budget and retention, on the same prepared windows and in one process:

- vLLM: one engine per method (the model class runs the method; plans come from the actor), every
  window in one generate call, with a KV cache of the same size for every setting (`--kv-windows`
  unpruned windows' worth of blocks, num_gpu_blocks_override). Measures windows/s, generated tokens/s,
  KV-cache tokens per window (prompt as the LLM holds it + generated), the most windows vLLM ran at
  once (its scheduler's running list, polled), the compute share kept, and fact F1. Times are medians
  of --repeats runs, each with vLLM's encoder cache emptied first.
- HF: the same at --hf-retentions, in batches of --batch-size; captions compared with vLLM's.

Unpruned rows: each engine's production path (method "none": vLLM's own processor on the compact window
for vLLM, the HF engine without a hook), and the pruned vLLM engine keeping every token ("keep all": the
same window item as the pruned rows, processor tensors from prepare), the fair baseline for pruning.
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
    block = 32  # the CPU attention backend takes multiples of 32
    lengths = [int(tok.unpack(b)["input_ids"].numel()) for b in blobs]
    blocks = args.kv_windows * math.ceil((statistics.median(lengths) + args.max_new_tokens) / block)
    context = max(lengths) + args.max_new_tokens  # vLLM wants one longest request to fit the cache
    kv_args = {"num_gpu_blocks_override": blocks, "block_size": block, "max_model_len": context}
    if blocks * block < context:
        raise ValueError(f"--kv-windows {args.kv_windows} gives {blocks * block} KV tokens, less than the "
                         f"longest window ({context})")

    def pruner(method, budget, retention):
        c_ref = calibrated_c_ref(method, retention, signals, layers, model_source=source) if budget == "adaptive" else None
        return make_pruner(method, retention, budget, c_ref, model_source=source)

    results = []

    def measured(engine, caption, data, batch, repeats=args.repeats):
        """(rows, median seconds over --repeats runs, most windows at once); vLLM's encoder cache is
        emptied before each run, so every run encodes every window."""
        runs = []
        for _ in range(repeats):
            peak = None
            if engine is not None:
                engine.llm.llm_engine.reset_encoder_cache()
                with PeakRunning(engine.llm) as poll:
                    rows, seconds = timed(caption, data, batch)
                peak = poll.peak
            else:
                rows, seconds = timed(caption, data, batch)
            runs.append((seconds, rows, peak))
        return runs[0][1], statistics.median(r[0] for r in runs), max((r[2] or 0) for r in runs) or None

    def record(engine, method, budget, retention, rows, seconds, peak=None):
        entry = {"engine": engine, "method": method, "budget": budget, "retention": retention,
                 "peak_windows_in_flight": peak, **_summary(rows, seconds, names, refs)}
        results.append(entry)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()
                          if k != "captions"}), flush=True)

    # vLLM, unpruned (the production path), then one engine per method.
    engine = VllmCaptioner(settings, engine_args=kv_args)
    record("vllm", "none", "fixed", 1.0, *measured(engine, engine.caption, compact, len(compact)))
    del engine
    gc.collect()
    for method in methods:
        engine = VllmCaptioner(dataclasses.replace(settings, pruner=method, retention=retentions[0]),
                               engine_args=kv_args)
        if method == methods[0]:  # the pruned engine keeping everything: same input path, no pruning
            engine.pruner = make_pruner(method, 1.0, "fixed", model_source=source)
            record("vllm", "keep all", "fixed", 1.0, *measured(engine, engine.caption, blobs, len(blobs)))
        for budget in budgets:
            for retention in retentions:
                engine.pruner = pruner(method, budget, retention)
                engine.retention = retention
                record("vllm", method, budget, retention, *measured(engine, engine.caption, blobs, len(blobs)))
        del engine
        gc.collect()

    # HF at the chosen retentions.
    hf = HfCaptioner(settings)
    if 1.0 in hf_retentions:
        record("hf", "none", "fixed", 1.0, *measured(None, hf.caption, blobs, args.batch_size, args.hf_repeats))
    for method in methods:
        for budget in budgets:
            for retention in sorted(hf_retentions & set(retentions), reverse=True):
                hf.hook = pruner(method, budget, retention)
                record("hf", method, budget, retention, *measured(None, hf.caption, blobs, args.batch_size, args.hf_repeats))

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
        plot(results, Path(args.out).with_suffix(".png"))
        Path(args.out).write_text(json.dumps({"windows": len(blobs), "kv_blocks": blocks, "block_size": block,
                                              "max_new_tokens": args.max_new_tokens, "results": results}, indent=1))
    return 0


def plot(results: list[dict], path: Path) -> None:
    """Fact F1 against retention: one colour per method, lines for vLLM (solid fixed, dashed adaptive),
    markers for the HF engine's settings (x fixed, + adaptive); the unpruned level as a grey line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    base = next(r for r in results if r["engine"] == "vllm" and r["method"] == "none")
    ax.axhline(base["fact_f1"], color="grey", lw=0.8, label="unpruned")
    methods = [m for m in dict.fromkeys(r["method"] for r in results) if m not in ("none", "keep all")]
    for k, method in enumerate(methods):
        for budget, line, marker in (("fixed", "-o", "x"), ("adaptive", "--s", "+")):
            mine = [r for r in results if r["method"] == method and r["budget"] == budget]
            vllm = sorted((r["retention"], r["fact_f1"]) for r in mine if r["engine"] == "vllm")
            if vllm:
                ax.plot(*zip(*vllm), line, color=f"C{k}", ms=4, label=f"{method} ({budget}), vLLM")
            for r in mine:
                if r["engine"] == "hf":
                    ax.plot(r["retention"], r["fact_f1"], marker, color=f"C{k}", ms=10)
    ax.set_xlabel("retention (compute budget)")
    ax.set_ylabel("fact F1")
    ax.set_title("vLLM engine (lines) and HF engine (x fixed, + adaptive)", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
