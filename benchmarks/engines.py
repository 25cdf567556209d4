"""The caption engines side by side on the same windows: unpruned (default), or pruned (--methods).

    .venv-vllm/bin/python -m benchmarks.engines --clips DIR [DIR ...] [--max-new-tokens 128] [--out FILE]
    .venv-vllm/bin/python -m benchmarks.engines --clips DIR --references DIR/references.jsonl \
        --methods random,uniform,avex,echoingpixels [--retentions 1.0,0.4,0.2,0.1] [--budgets fixed,adaptive] \
        [--hf-retentions 1.0,0.2] [--kv-windows 8] [--repeats 3] [--out FILE]

Every clip is prepared once per input form from the same decode settings (the embedded model's
recommended sizes). Unpruned, one engine after another in this process: (a) the HF engine in batches of
--batch-size, (b) the vLLM engine with all windows in one call (continuous batching), (c) the same vLLM
engine with stock vLLM's TMRoPE positions (StockPositionsOmniThinker). Prints windows/s, generated
tokens/s, captions identical to the HF engine's, and object-store bytes per window for each input form.

With --methods (benchmarks/pruning_grid.py): every method x budget x retention on vLLM, and the HF engine
at --hf-retentions, each with windows/s, tokens/s, KV-cache tokens per window, the most windows vLLM ran at
once in a KV cache of the same size for every setting, fact F1, and captions identical across engines.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

from operators.caption import CaptionSettings
from operators.models.qwen2_5_omni import model_card, resolve_model_source
from operators.prepare import PrepareSettings, prepare_windows
from pipelines.config import DEFAULT_PROMPT

MEDIA = (".mp4", ".webm", ".mkv", ".mov")


def prepared(files: list[Path], settings: PrepareSettings, names: list | None = None) -> list[bytes]:
    """Every window of `files` (in order) as `settings` prepares it; `names` gets each window's file name."""
    blobs = []
    for path in files:
        row = {"source_id": path.name, "clip_id": None, "uri": str(path), "start_s": None, "end_s": None,
               "prompt": None}
        for window in prepare_windows(row, settings):
            if window["status"] != "ok":
                raise RuntimeError(f"{path}: {window['error']}")
            blobs.append(window["model_inputs"])
            if names is not None:
                names.append(path.name)
    return blobs


def timed(caption, blobs: list[bytes], batch: int) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    rows = [r for i in range(0, len(blobs), batch) for r in caption(blobs[i:i + batch])]
    return rows, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", nargs="+", required=True, help="folders of clips")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="HF engine batch (the job's default is 4)")
    parser.add_argument("--out", help="write the measurements as JSON here")
    parser.add_argument("--references", help="references.jsonl of the clips (for fact F1; with --methods)")
    parser.add_argument("--methods", help="comma-separated pre-LLM methods: run the pruning grid")
    parser.add_argument("--retentions", default="1.0,0.4,0.2,0.1")
    parser.add_argument("--budgets", default="fixed,adaptive")
    parser.add_argument("--hf-retentions", default="1.0,0.2", help="retentions the HF engine also runs")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (median time; with --methods)")
    parser.add_argument("--hf-repeats", type=int, default=1, help="runs per HF setting (it has no cache to empty)")
    parser.add_argument("--kv-windows", type=int, default=8,
                        help="KV cache sized for this many unpruned windows, the same for every setting")
    args = parser.parse_args(argv)
    if args.methods:
        from benchmarks.pruning_grid import run_grid

        return run_grid(args)

    source = resolve_model_source(None)
    files = sorted(p for d in args.clips for p in Path(d).iterdir() if p.suffix in MEDIA)
    pre = PrepareSettings(model=source, prompt=DEFAULT_PROMPT, **model_card(source)["preprocess"])
    hf_blobs = prepared(files, pre)
    vllm_blobs = prepared(files, PrepareSettings(**{**pre.__dict__, "window_form": "compact"}))
    settings = CaptionSettings(model=source, device="cpu", dtype="float32", max_new_tokens=args.max_new_tokens)

    from operators.engines.hf import HfCaptioner
    from operators.engines.vllm import VllmCaptioner
    from operators.engines.vllm_checkpoint import STOCK_POSITIONS_ARCHITECTURE

    results = {}
    hf = HfCaptioner(settings)
    results["hf"] = timed(hf.caption, hf_blobs, args.batch_size)
    del hf
    for name, architecture in (("vllm", None), ("vllm-stock-positions", STOCK_POSITIONS_ARCHITECTURE)):
        engine = VllmCaptioner(settings, architecture)
        results[name] = timed(engine.caption, vllm_blobs, len(vllm_blobs))
        del engine
        gc.collect()

    reference = [r["caption"] for r in results["hf"][0]]
    table = {"windows": len(hf_blobs), "clips": len(files), "max_new_tokens": args.max_new_tokens,
             "bytes_per_window_median": {"hf (float32 patches + features)": statistics.median(map(len, hf_blobs)),
                                         "vllm (uint8 frames + samples)": statistics.median(map(len, vllm_blobs))}}
    print(f"{len(hf_blobs)} windows from {len(files)} clips, float32, greedy, up to {args.max_new_tokens} tokens")
    print("| engine | seconds | windows/s | generated tokens/s | captions identical to HF |")
    print("|---|---|---|---|---|")
    for name, (rows, seconds) in results.items():
        tokens = sum(r["output_tokens"] for r in rows)
        same = sum(r["caption"] == ref for r, ref in zip(rows, reference))
        table[name] = {"seconds": seconds, "windows_per_s": len(rows) / seconds, "tokens_per_s": tokens / seconds,
                       "identical": same, "captions": [r["caption"] for r in rows]}
        print(f"| {name} | {seconds:.1f} | {len(rows) / seconds:.2f} | {tokens / seconds:.0f} | "
              f"{same}/{len(rows)} |")
    print("object-store bytes per window (median):", json.dumps(table["bytes_per_window_median"]))
    if args.out:
        Path(args.out).write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
