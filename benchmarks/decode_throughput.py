"""Decode stage vs plain decord, side by side in one process.

Both sides decode the same windows of the same clips: frames at --fps and 16 kHz mono audio. The
stage side runs operators.decode exactly as the caption job does (open, probe, plan windows, frame
timestamps, resize-at-decode to --max-pixels, audio slicing); the plain side calls decord directly
(VideoReader + get_batch at the same times, AudioReader), without resizing. Rounds alternate the
two sides and the script prints the median throughput of each and their ratio (stage / plain).

    python -m benchmarks.decode_throughput --clips ../shared/data/clips --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def stage_decode(path: str, fps: float, window_s: float, max_frames: int, max_pixels: int | None) -> int:
    from operators import decode as dec

    src = dec.open_media(path)
    info, reader = dec.probe(src, max_pixels)
    audio = dec.read_audio_track(src)
    frames = 0
    for start, end in dec.plan_windows(info.duration_s, None, None, window_s):
        window = dec.decode_window(reader, start, end, fps, max_frames, audio)
        frames += len(window.frames)
    return frames


def plain_decode(path: str, fps: float, window_s: float, max_frames: int) -> int:
    from decord import AudioReader, VideoReader, cpu

    from operators import decode as dec

    reader = VideoReader(path, ctx=cpu(0))
    duration = reader.get_frame_timestamp(len(reader) - 1)[1]
    try:
        audio = AudioReader(path, ctx=cpu(0), sample_rate=16000, mono=True)[:].asnumpy()
    except Exception:  # no audio stream
        audio = None
    frames = 0
    avg_fps = reader.get_avg_fps()
    for start, end in dec.plan_windows(duration, None, None, window_s):
        times, _ = dec.frame_times(start, end, fps, max_frames)
        index = np.clip((times * avg_fps).astype(int), 0, len(reader) - 1)
        frames += len(reader.get_batch(index.tolist()).asnumpy())
        if audio is not None:
            _ = audio[:, int(start * 16000):int(end * 16000)]
    return frames


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", default="../shared/data/clips")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--max-frames", type=int, default=64)
    parser.add_argument("--max-pixels", type=int, default=168 * 168)
    args = parser.parse_args(argv)
    paths = sorted(str(p) for p in Path(args.clips).iterdir() if p.suffix in (".mp4", ".webm", ".mkv", ".mov"))
    stage, plain = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        n_stage = sum(stage_decode(p, args.fps, args.window_s, args.max_frames, args.max_pixels) for p in paths)
        t1 = time.perf_counter()
        n_plain = sum(plain_decode(p, args.fps, args.window_s, args.max_frames) for p in paths)
        t2 = time.perf_counter()
        assert n_stage == n_plain, (n_stage, n_plain)
        stage.append(len(paths) / (t1 - t0))
        plain.append(len(paths) / (t2 - t1))
    result = {
        "clips": len(paths), "frames_per_round": n_stage, "rounds": args.rounds,
        "stage_clips_per_s_median": round(statistics.median(stage), 3),
        "plain_decord_clips_per_s_median": round(statistics.median(plain), 3),
        "ratio_stage_over_plain": round(statistics.median(s / p for s, p in zip(stage, plain)), 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
