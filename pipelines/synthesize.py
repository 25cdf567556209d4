"""Make a split of the synthetic audio-visual world: mp4 clips + references.jsonl.

    python -m pipelines.synthesize --out DIR --n N --seed S [--split train|val|test] [--workers 2] [--sound-only]

Clip i of (split, seed) is a pure function of (split, seed, i) (operators/synth/world.py), so splits
never overlap, N can grow without changing earlier clips, and reruns are byte-identical. With
--sound-only each clip is written as its sound alone (.m4a, no video stream) and its reference holds its
audio facts only: an audio-only split, for captioning sound without a picture.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def clip_name(split: str, seed: int, index: int, sound_only: bool = False) -> str:
    return f"{split}-s{seed}-{index:06d}.{'m4a' if sound_only else 'mp4'}"


def _make_one(args: tuple) -> dict:
    from operators.synth import world

    out, split, seed, index, sound_only = args
    spec = world.sample_clip(world.clip_rng(split, seed, index))
    name = clip_name(split, seed, index, sound_only)
    path = Path(out) / name
    if not path.exists():
        world.write_clip(spec, str(path), sound_only)
    caption, facts, modalities = (world.sound_caption_facts if sound_only else world.caption_facts)(spec)
    return {"file": name, "caption": caption, "facts": facts, "fact_modalities": modalities,
            "duration_s": float(spec.duration_s), "split": split, "seed": seed}


def synthesize(out: str, n: int, seed: int, split: str = "test", workers: int = 2, sound_only: bool = False) -> Path:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder), split, seed, i, sound_only) for i in range(n)]
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
    parser.add_argument("--sound-only", action="store_true", help="write each clip's sound alone (.m4a)")
    args = parser.parse_args(argv)
    print(synthesize(args.out, args.n, args.seed, args.split, args.workers, args.sound_only))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
