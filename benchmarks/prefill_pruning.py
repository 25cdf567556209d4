"""LLM prefill latency, peak memory and FLOPs per pruning method and retention, side by side in one run.

The model is a Qwen2.5-Omni thinker of 7B width (hidden 3584, 28 heads / 4 KV heads, MLP 18944) with
random weights built locally; on CPU it has fewer decoder layers (--layers). Its audio/vision encoders are
small ones with the LLM's output width by default, or the 7B checkpoint's sizes with `--encoders 7b`.
It is fed one real clip window of --window-s seconds (>= 2,000 audio+video tokens at the defaults).
Every method runs: the trained ones (echoingpixels, avex) with random-weight nets of the right shape (the
sieve with round(4 L / 28) layers, the paper's 4 of 28), since their speed does not depend on the weights.

Two times per setting: the LLM prefill alone (PrunableDecoder.prefill, the sieve and scorer included),
and the whole thinker per window (encoders + merge + prefill: what a user waits for before the first
token), each the median of --repeats runs after a warm-up.

Latency: median of --repeats runs after one warm-up run per setting. Memory: the process's peak RSS
during prefill minus the RSS before it (Linux VmHWM reset through /proc/self/clear_refs; it
under-reports when the allocator reuses freed pages: run with MALLOC_MMAP_THRESHOLD_=65536 so that glibc
gives large tensors back to the system when they are freed), or torch.cuda.max_memory_allocated on GPU; plus
the exact size of the KV cache the prefill leaves. FLOPs: analytic, from the kept token counts of every
layer.

    python -m benchmarks.prefill_pruning --clip ../shared/data/clips/moviepy_trailer_bbb.mp4

`--family qwen3-omni` builds a Qwen3-Omni thinker of 30B-A3B width instead (hidden 2048, 32 heads / 4 KV
heads of 128, every layer a mixture of 128 experts of width 768 with 8 active per token), with small
encoders (DeepStack included) and the processor of `avsieve build-test-model --family qwen3-omni`; the
rows add the KV cache that the kept tokens would take at the checkpoint's full depth (48 layers).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

RETENTIONS = (1.0, 0.6, 0.4, 0.2, 0.1)
QWEN25_7B_LAYERS = 28  # decoder depth of the checkpoints whose width the benchmark models take
QWEN3_A3B_LAYERS = 48
METHODS = ("random", "uniform", "fastv", "fastav", "echoingpixels", "avex")
# Qwen2.5-Omni-7B's encoder sizes (its thinker config), for --encoders 7b.
ENCODERS_7B = {
    "audio": dict(encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                   fullatt_block_indexes=[7, 15, 23, 31]),
}


def build_model(layers: int, dtype: torch.dtype, device: str, attn: str, full_depth: bool, encoders: str = "small"):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from operators.models.embedded import EMBEDDED_MODEL_DIR, tiny_thinker_config
    from operators.models.qwen2_5_omni import load_processor

    processor = load_processor(str(EMBEDDED_MODEL_DIR))
    cfg = tiny_thinker_config(processor.tokenizer, hidden=3584, layers=QWEN25_7B_LAYERS if full_depth else layers,
                              heads=28, kv_heads=4)
    cfg.text_config.intermediate_size = 18944
    if encoders == "7b":
        for key, value in ENCODERS_7B["audio"].items():
            setattr(cfg.audio_config, key, value)
        for key, value in ENCODERS_7B["vision"].items():
            setattr(cfg.vision_config, key, value)
    cfg.text_config.rope_parameters["mrope_section"] = [16, 24, 24]  # the 7B's TMRoPE split
    cfg.text_config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).to(dtype).eval()
    return model, processor


def build_qwen3_model(layers: int, dtype: torch.dtype, device: str, attn: str, processor_dir: Path):
    """A Qwen3-Omni thinker of 30B-A3B text width with random weights and `layers` decoder layers; small
    encoders (their cost is the same at every retention). processor_dir gets the tiny test checkpoint,
    whose processor and tokenizer the window is made with."""
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from operators.models.qwen2_5_omni import load_processor
    from operators.models.qwen3_omni import build_tiny, tiny_thinker_config

    build_tiny(processor_dir)
    processor = load_processor(str(processor_dir))
    cfg = tiny_thinker_config(processor.tokenizer, hidden=2048, layers=layers, heads=32, kv_heads=4,
                              experts=128, active=8)
    text = cfg.text_config
    text.head_dim, text.moe_intermediate_size, text.mlp_only_layers = 128, 768, []
    text.rope_parameters["mrope_section"] = [24, 20, 20]  # 64 frequency pairs, as in the checkpoint
    text._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3OmniMoeThinkerForConditionalGeneration(cfg).to(dtype).eval()
    return model, processor


def clip_inputs(clip: str, window_s: float, max_pixels: int, model_dir: str | None = None):
    from operators.prepare import PrepareSettings, prepare_windows
    from operators.sources import list_inputs
    from operators.tokenize import unpack

    from operators.models.embedded import EMBEDDED_MODEL_DIR

    # The embedded model's processor is the one the benchmark model was built with.
    settings = PrepareSettings(model=model_dir or str(EMBEDDED_MODEL_DIR), prompt="Describe what is seen and heard in this clip.",
                               max_pixels=max_pixels, min_pixels=56 * 56, window_s=window_s, max_frames=128)
    row = list_inputs(clip)[0]
    row["end_s"] = window_s
    window = next(prepare_windows(row, settings))
    assert window["status"] == "ok", window["error"]
    return unpack(window["model_inputs"])


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def timed_median(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def learned_net(method: str, text_cfg):
    """A random-weight net of the shape the method runs (its speed does not depend on the weights)."""
    from operators.pruning.learned import PolicyNet, SieveNet

    torch.manual_seed(0)
    if method == "echoingpixels":
        return SieveNet(text_cfg, max(1, round(4 * text_cfg.num_hidden_layers / 28)), per_modality=True,
                        selection="stratified")
    if method == "avex":
        return PolicyNet(text_cfg.hidden_size)
    return None


def measure(decoder, state, extras, hook, device, repeats):
    last = {}

    def once():
        last["extras"] = dict(extras)
        return decoder.prefill(state, hook=hook, extras=last["extras"])

    seconds = timed_median(once, device, repeats)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = once()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        base = _rss_kib("VmRSS:")
        result = once()
        peak_mib = (_rss_kib("VmHWM:") - base) / 1024
    return seconds, peak_mib, result, last["extras"].get("extra_layer_tokens", [[]])[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="../shared/data/clips/moviepy_trailer_bbb.mp4")
    parser.add_argument("--window-s", type=float, default=32.0)
    parser.add_argument("--max-pixels", type=int, default=196 * 336)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers on CPU (28 with --full-depth)")
    parser.add_argument("--full-depth", action="store_true", help="all 28 layers (GPU)")
    parser.add_argument("--encoders", default="small", choices=("small", "7b"),
                        help="audio/vision encoder sizes: small (CPU) or the 7B checkpoint's")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--retentions", default=",".join(map(str, RETENTIONS)))
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--family", default="qwen2.5-omni", choices=("qwen2.5-omni", "qwen3-omni"))
    args = parser.parse_args(argv)

    from operators.models.qwen2_5_omni import OmniThinker
    from operators.pruning import make_pruner
    from operators.pruning.flops import prefill_flops

    dtype = getattr(torch, args.dtype)
    processor_dir = None
    if args.family == "qwen3-omni":
        processor_dir = Path(tempfile.mkdtemp(prefix="avsieve-q3-"))
        model, processor = build_qwen3_model(args.layers, dtype, args.device, args.attn, processor_dir)
    else:
        model, processor = build_model(args.layers, dtype, args.device, args.attn, args.full_depth, args.encoders)
    thinker = OmniThinker.from_loaded(model, processor, args.device)
    decoder, cfg = thinker.decoder, model.config
    sample = clip_inputs(args.clip, args.window_s, args.max_pixels, processor_dir and str(processor_dir))
    batch = thinker.collate([sample])
    with torch.no_grad():
        emb = thinker.embed(batch)
        encode_s = timed_median(lambda: thinker.embed(batch), args.device, args.repeats)  # encoders + merge
    text_cfg = cfg.get_text_config()
    n_video = int((emb.input_ids == cfg.video_token_id).sum())
    n_audio = int((emb.input_ids == cfg.audio_token_id).sum())
    print(json.dumps({"setup": {"family": args.family, "layers": text_cfg.num_hidden_layers,
                                "hidden": text_cfg.hidden_size,
                                "dtype": args.dtype, "device": args.device, "attn": args.attn,
                                "video_tokens": n_video, "audio_tokens": n_audio,
                                "prompt_tokens": int(emb.state.valid.sum()), "repeats": args.repeats,
                                "encoders": args.encoders, "encode_s": round(encode_s, 4)}}))
    rows = []
    settings = [("none", 1.0)] + [(m, r) for m in args.methods.split(",") for r in map(float, args.retentions.split(","))
                                  if r < 1.0]
    for method, retention in settings:
        net = learned_net(method, text_cfg)
        hook = make_pruner(method, retention, "fixed", **({"net": net.to(args.device, dtype)} if net else {}))
        seconds, peak_mib, result, sieve_layers = measure(decoder, emb.state, emb.extras, hook, args.device,
                                                          args.repeats)
        per_layer = [int(k[0].sum()) for k in result.kept_per_layer]
        av_layers = sum(int(k[0, 1] + k[0, 2]) for k in result.kept_per_layer)
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
        token_bytes = 2 * text_cfg.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8  # K and V, one layer
        kv_bytes = sum(per_layer) * token_bytes
        full_depth = QWEN3_A3B_LAYERS if args.family == "qwen3-omni" else QWEN25_7B_LAYERS
        kv_full_bytes = sum(per_layer) / len(per_layer) * full_depth * token_bytes  # layer mean x full depth
        rows.append({"method": method, "retention": retention, "prefill_s": round(seconds, 4),
                     "thinker_s": round(encode_s + seconds, 4),
                     "peak_mib": round(peak_mib, 1), "kv_cache_mib": round(kv_bytes / 2**20, 1),
                     "kv_full_depth_mib": round(kv_full_bytes / 2**20, 1),
                     "flops": prefill_flops(per_layer + sieve_layers, text_cfg), "av_token_layers": av_layers})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print("\n| method | retention | prefill s (median) | prefill speed-up | whole thinker s | whole thinker speed-up "
          "| peak RSS MiB | KV cache MiB | KV at full depth MiB | FLOPs vs 1.0 | effective retention |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        effective = row["av_token_layers"] / base["av_token_layers"]
        print(f"| {row['method']} | {row['retention']} | {row['prefill_s']:.3f} | "
              f"{base['prefill_s'] / row['prefill_s']:.2f}x | {row['thinker_s']:.3f} | "
              f"{base['thinker_s'] / row['thinker_s']:.2f}x | {row['peak_mib']:.0f} | {row['kv_cache_mib']:.1f} | "
              f"{row['kv_full_depth_mib']:.0f} | "
              f"{row['flops'] / base['flops']:.3f} | {effective:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if processor_dir is not None:
        shutil.rmtree(processor_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
