"""Training step time of the embedded captioner under bfloat16 autocast against plain float32, side by side.

On a CPU without bfloat16 matrix units (AVX-512 but no AMX, like the 2-core development machine) PyTorch's
bfloat16 matmuls are slower than float32 ones, so autocast can cost time instead of saving it. This
script times the two stages of pipelines.train_captioner as it runs them, from the same initial weights
and the same batches:
- a vision warm-up step (frame pairs from --warmup-frames clips, the tower and its probe heads);
- a joint step on the cached fixed tower (caption loss + encoder targets), full token stream;
- a pruning-aware joint step (the same, on a randomly kept share of the tokens).
Rounds alternate the two precisions; it prints the median seconds of each step kind and the ratio.

    python -m benchmarks.training_precision --work out/train --clips 160 --steps 8 --rounds 2

--work is a train_captioner work folder; clips and their tokenized cache are made there if missing.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path

import torch


def load(work: str, clips: int):
    """Processor, the first `clips` tokenized training clips with their targets, and an initial model."""
    from pipelines import train_captioner as tc

    cfg = tc.TrainConfig(work=work, n_train=clips, n_val=1)
    tc.make_splits(cfg)
    model_dir = Path(work) / "model"
    processor = tc.build_model_dir(cfg, model_dir)
    items = tc.tokenize_split(cfg, "train", model_dir)
    torch.manual_seed(0)
    model = tc.new_model(cfg, processor.tokenizer)
    tc.attach_targets(items, model)
    return cfg, processor, items, model


def time_steps(cfg, processor, items, initial, bf16: bool, steps: int, warmup_frames: int) -> dict:
    """Median seconds per step of each kind, training a copy of `initial` under one precision, through
    train_captioner's own loss and update functions."""
    from dataclasses import replace

    from operators.models.qwen2_5_omni import OmniThinker
    from pipelines import train_captioner as tc

    cfg = replace(cfg, bf16_autocast=bf16)
    model = copy.deepcopy(initial).train()
    items = [dict(it) for it in items]  # cache_tower_outputs replaces each item's pixels
    probe = tc.EncoderProbe(model, cfg.hidden)
    rng = random.Random(1)
    pairs = [(i, g) for i, it in enumerate(items) for g in range(int(it["inputs"]["video_grid_thw"][0, 0]))]
    times: dict[str, list[float]] = {"warm-up": [], "joint": [], "pruned joint": []}

    def step(kind: str, opt, params, loss_fn) -> None:
        t0 = time.perf_counter()
        tc.optimizer_step(opt, loss_fn(), params)
        times[kind].append(time.perf_counter() - t0)

    params = list(model.model.visual.parameters()) + list(probe.vision_heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    for _ in range(steps):
        chosen = [tc.frame_pair(items[i], g) for i, g in rng.sample(pairs, min(warmup_frames, len(pairs)))]
        step("warm-up", opt, params, lambda: tc.warmup_loss(model, probe, chosen, bf16))

    tc.freeze_vision_tower(model)
    tc.cache_tower_outputs(model, items, bf16_autocast=bf16)
    params = [p for p in list(model.parameters()) + list(probe.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    thinker = OmniThinker.from_loaded(model, processor, "cpu")
    gen = torch.Generator().manual_seed(0)
    lengths = [int(it["inputs"]["input_ids"].numel()) for it in items]
    batches = tc.epoch_batches(lengths, cfg.batch_size, cfg.length_pool, random.Random(2))

    def joint(chosen, prune_gen):
        loss, aux = tc.joint_loss(thinker, probe, chosen, cfg, prune_gen, vision_frozen=True, audio_frozen=False)
        return loss + aux

    for s in range(steps):
        chosen = [items[i] for i in batches[s % len(batches)]]
        step("joint", opt, params, lambda: joint(chosen, None))
        step("pruned joint", opt, params, lambda: joint(chosen, gen))
    # The first step of each kind pays one-off costs (allocator, kernel choice).
    return {kind: statistics.median(ts[1:] if len(ts) > 1 else ts) for kind, ts in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="out/train")
    parser.add_argument("--clips", type=int, default=160)
    parser.add_argument("--steps", type=int, default=8, help="steps of each kind per round and precision")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup-frames", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, processor, items, initial = load(args.work, args.clips)
    runs: dict[str, list[dict]] = {"bfloat16 autocast": [], "float32": []}
    for _ in range(args.rounds):
        for name, bf16 in (("bfloat16 autocast", True), ("float32", False)):
            runs[name].append(time_steps(cfg, processor, items, initial, bf16, args.steps, args.warmup_frames))
            print(json.dumps({"precision": name, **{k: round(v, 3) for k, v in runs[name][-1].items()}}), flush=True)
    kinds = list(runs["float32"][0])
    median = {name: {k: statistics.median(r[k] for r in rs) for k in kinds} for name, rs in runs.items()}
    print("\n| step | bfloat16 autocast s (median) | float32 s (median) | bf16 / fp32 |")
    print("|---|---|---|---|")
    for k in kinds:
        b, f = median["bfloat16 autocast"][k], median["float32"][k]
        print(f"| {k} | {b:.3f} | {f:.3f} | {b / f:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
