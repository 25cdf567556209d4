"""Make a split of the synthetic audio-visual world: mp4 clips + references.jsonl.

    python -m pipelines.synthesize --out DIR --n N --seed S [--split train|val|test] [--workers 2]

Clip i of (split, seed) is a pure function of (split, seed, i) (operators/synth/world.py), so splits
never overlap, N can grow without changing earlier clips, and reruns are byte-identical.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def clip_name(split: str, seed: int, index: int) -> str:
    return f"{split}-s{seed}-{index:06d}.mp4"


def _make_one(args: tuple) -> dict:
    from operators.synth import world

    out, split, seed, index = args
    spec = world.sample_clip(world.clip_rng(split, seed, index))
    name = clip_name(split, seed, index)
    path = Path(out) / name
    if not path.exists():
        world.write_clip(spec, str(path))
    caption, facts, modalities = world.caption_facts(spec)
    return {"file": name, "caption": caption, "facts": facts, "fact_modalities": modalities,
            "duration_s": float(spec.duration_s), "split": split, "seed": seed}


def synthesize(out: str, n: int, seed: int, split: str = "test", workers: int = 2) -> Path:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder), split, seed, i) for i in range(n)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            lines = list(pool.map(_make_one, jobs, chunksize=16))
    else:
        lines = [_make_one(job) for job in jobs]
    refs = folder / "references.jsonl"
    refs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return refs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avsieve synthesize", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    print(synthesize(args.out, args.n, args.seed, args.split, args.workers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
