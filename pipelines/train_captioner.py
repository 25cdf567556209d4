"""Train the embedded default model from scratch on the synthetic audio-visual world (CPU, fixed seed).

    python -m pipelines.train_captioner --work out/train --out operators/models/embedded

1. makes the train/val splits with the synthetic world (operators/synth), unless they exist;
2. builds the tokenizer (byte-level BPE over the world's caption grammar) and the Qwen2.5-Omni processor;
3. decodes and tokenizes every clip through the caption job's own prepare stage (the same decode and
   processor path as inference) and caches the tensors;
4. trains Qwen2_5OmniThinkerForConditionalGeneration in two stages: first the vision tower alone on dense
   per-token targets (operators/synth/targets.py: which object covers each video token; small
   training-only heads, not saved), then, with the tower's blocks fixed (their outputs cached per clip),
   the rest (audio tower, vision merger, LLM) with next-token loss on the reference caption plus the same
   kind of targets on both encoders' outputs;
5. saves a from_pretrained directory (weights in bfloat16, processor, model card with the config and
   validation scores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TrainConfig:
    work: str = "out/train"
    out: str = "operators/models/embedded"
    seed: int = 0
    n_train: int = 4000
    n_val: int = 64
    # Joint steps. Counted in steps, not minutes, so the same command trains the same model on any machine
    # (1,465 = what v8's 36-minute budget gave on the 2-core reference machine).
    steps: int = 1465
    batch_size: int = 16
    lr: float = 1.5e-3
    min_lr: float = 1e-4
    warmup: int = 150
    weight_decay: float = 0.01
    hidden: int = 256
    vision_hidden: int = 192
    vision_depth: int = 3
    layers: int = 6
    aux_weight: float = 0.5  # weight of the encoders' per-token targets next to the caption loss
    # Pruning-aware training: this share of steps captions from a pruned token stream (see keep_sets).
    prune_fraction: float = 0.3
    prune_min_retention: float = 0.08
    prune_max_retention: float = 0.5
    prune_informed: float = 0.75  # share of pruned steps that keep informative tokens first
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 600
    eval_every: int = 500
    threads: int = 2
    # bfloat16 autocast pays only on CPUs with bfloat16 matrix units (AMX); on the 2-core development
    # machine (AVX-512, no AMX) float32 steps are faster (benchmarks/training_precision.py, figures in
    # BENCHMARKS.md), so float32 is the default.
    bf16_autocast: bool = False
    sync_rope: bool = False  # train with EchoingPixels' Sync-RoPE layout (operators/models/rope.py)
    # Optional time cap on the joint loop (0 = none); the learning rate then also decays along the minutes.
    max_minutes: float = 0.0
    # Steps of a first stage that trains the vision tower alone on its per-token targets (0 = none; 815 =
    # v8's 22 minutes). Trained jointly from the start, the tower never learned shape (29% of objects
    # right); warmed up alone first and then kept fixed (freeze_vision), 88% (docs/experiments.md, v6).
    vision_warmup_steps: int = 815
    vision_warmup_minutes: float = 0.0  # optional time cap on the warm-up (0 = none); alone, it sets its length
    # Warm-up batches are single temporal patches (frame pairs) drawn from this many different clips:
    # more distinct objects per step than whole clips for the same compute.
    vision_warmup_frames: int = 96
    # True: the warm-up's learning rate falls from lr to min_lr along a cosine over the warm-up instead of
    # staying at lr. Tried as v10: the fixed tower then served the captions worse (shape 82% against 88%,
    # visual fact F1 0.730 against 0.852; docs/experiments.md), so off by default.
    vision_warmup_anneal: bool = False
    # After the warm-up (if there was one), keep the tower's patch embedding and blocks fixed (the merger
    # still trains), so joint training cannot wash out what the warm-up learned; its steps then start from
    # each clip's cached block outputs (cache_tower_outputs) instead of running the tower.
    freeze_vision: bool = True
    # Joint batches are cut from runs of this many batches' worth of shuffled clips, each run sorted by
    # sequence length, so a batch pads less (a joint step 1.47 s instead of 1.59 s; docs/experiments.md, v8).
    # 1 = plain random batches.
    length_pool: int = 8
    # Steps of a stage that trains the audio tower alone on its per-token targets (operators/synth/targets.py),
    # in batches of audio_warmup_clips whole clips, before joint training; the tower is then kept fixed and
    # its output cached per clip, so joint steps skip it (0 = none: the tower trains jointly).
    audio_warmup_steps: int = 0
    audio_warmup_clips: int = 32
    # True: each training clip comes once per epoch for each object it shows (epoch_batches' repeats), to
    # spend more steps on busy clips. Tried as v9: three-object recall up, audio down, visual within noise
    # of v8 (docs/experiments.md), so off by default.
    repeat_by_objects: bool = False
    # Weight of a training-only target on the language model's hidden states: at each caption token,
    # which visual objects are still to be named and how many (targets.enumeration_targets), so the
    # model learns to account for every object, not only the first (0 = off; v18 in docs/experiments.md).
    enumeration_weight: float = 0.5
    # Where the enumeration heads read: the output of this decoder layer (0-based), or -1 for the language
    # model's output after its final norm, the state the next-token head reads too. Read there (v16), the
    # target fought the next-token loss and broke attributes; a middle layer carries it.
    enumeration_layer: int = 2
    # Sound alone (issue 29): this many clips of the world written as audio-only .m4a files (train split,
    # seed + SOUND_SEED_OFFSET, so other clips than the audio-visual ones; captions of their audio facts
    # only) join the training mix, batched among themselves; n_val_sound such clips of the val split are
    # scored beside the audio-visual val split. 0 = none.
    n_train_sound: int = 0
    n_val_sound: int = 0
    # Start from this model directory's weights and processor instead of fresh ones (fine-tuning). Its
    # vision tower counts as trained: no warm-up; with freeze_vision it stays fixed as after a warm-up.
    init_from: str = ""


KEY_FILE = "tokenized.json"  # beside a split's tokenized.pt: the key it was made under
SOUND_SEED_OFFSET = 1  # the sound-alone train split draws other clips than the audio-visual one
SOUND_SUFFIX = "_sound"  # a split folder of sound-alone clips: train_sound, val_sound


def _split_dir(cfg: TrainConfig, split: str) -> Path:
    return Path(cfg.work) / split


def split_sizes(cfg: TrainConfig) -> dict[str, int]:
    """Clips per split folder (a folder name ending in SOUND_SUFFIX holds sound-alone clips)."""
    return {"train": cfg.n_train, "val": cfg.n_val, "train" + SOUND_SUFFIX: cfg.n_train_sound,
            "val" + SOUND_SUFFIX: cfg.n_val_sound}


def make_splits(cfg: TrainConfig) -> None:
    from pipelines.synthesize import synthesize

    for split, n in split_sizes(cfg).items():
        folder = _split_dir(cfg, split)
        refs = folder / "references.jsonl"
        if n == 0 or refs.exists() and sum(1 for _ in refs.open()) >= n:
            continue
        t0 = time.perf_counter()
        sound_only = split.endswith(SOUND_SUFFIX)
        world_split = split.removesuffix(SOUND_SUFFIX)
        seed = cfg.seed + SOUND_SEED_OFFSET if sound_only and world_split == "train" else cfg.seed
        synthesize(str(folder), n, seed, world_split, sound_only=sound_only)
        print(f"synthesized {n} {split} clips in {time.perf_counter() - t0:.0f}s", flush=True)


def build_model_dir(cfg: TrainConfig, model_dir: Path):
    """Tokenizer + processor saved to model_dir (prepare_windows loads the processor from there); when
    fine-tuning, the starting model's own."""
    from transformers import AutoProcessor

    from operators.models.embedded import PREPROCESS, build_processor, build_tokenizer
    from operators.synth.world import caption_corpus

    if cfg.init_from:
        copy_model_files(cfg.init_from, model_dir)
        return AutoProcessor.from_pretrained(model_dir)
    tokenizer = build_tokenizer(caption_corpus(), vocab_size=cfg.vocab_size)
    processor = build_processor(tokenizer, max_pixels=PREPROCESS["max_pixels"], min_pixels=PREPROCESS["min_pixels"])
    model_dir.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(model_dir)
    return processor


def copy_model_files(source: str | Path, out: Path) -> None:
    """A fine-tuned model's files other than its weights and card, byte for byte from the model it started
    from: the same architecture, tokenizer, processor and template (a load-and-save round trip would
    rewrite the tokenizer's files in another, equivalent form and add a dtype to the config)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for path in Path(source).iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "avsieve_model.json":
            shutil.copyfile(path, out / path.name)


def tokenize_split(cfg: TrainConfig, split: str, model_dir: Path) -> list[dict]:
    """[{file, caption, inputs}] for the split's first n_train / n_val clips, cached next to the clips.
    The cache only grows: a larger n tokenizes just the clips it lacks (and a smaller n reads a subset).
    It is keyed to the prepare settings and the processor's files (tokenized.json): if either changed,
    every clip is tokenized again."""
    from operators import tokenize as tok
    from operators.prepare import prepare_windows
    from operators.sources import list_inputs

    folder = _split_dir(cfg, split)
    cache, key_file = folder / "tokenized.pt", folder / KEY_FILE
    n = split_sizes(cfg)[split]
    with (folder / "references.jsonl").open() as lines:
        refs = [json.loads(line) for line, _ in zip(lines, range(n))]  # synthesize writes clips in index order
    settings = cache_settings(model_dir)
    key = tokenization_key(settings, model_dir)
    stored = stored_tokenization_key(folder)
    if cache.exists() and stored != key:
        print(f"{cache}: made with other tokenization settings or processor files "
              f"({stored or 'no key recorded'} != {key}); tokenizing the split again", flush=True)
    # Memory-mapped: the float16 tensors (6 GB for 4,000 clips) are paged in from the file as they are read.
    cached = {item["file"]: _compact(item) for item in torch.load(cache, weights_only=False, mmap=True)} \
        if cache.exists() and stored == key else {}
    missing = {ref["file"]: ref for ref in refs if ref["file"] not in cached}
    if missing:
        t0 = time.perf_counter()
        for row in list_inputs(str(folder)):
            name = Path(row["uri"]).name
            if name not in missing:
                continue
            windows = list(prepare_windows(row, settings))
            if len(windows) != 1 or windows[0]["status"] != "ok":
                raise RuntimeError(f"{name}: expected one clean window, got "
                                   f"{[w['status'] + ' ' + str(w.get('error')) for w in windows]}")
            cached[name] = _compact({"file": name, "caption": missing[name]["caption"],
                                     "inputs": tok.unpack(windows[0]["model_inputs"])})
        # Written aside, then renamed: the old file stays mapped (float16 tensors are read in place).
        partial = cache.with_name(cache.name + ".partial")
        torch.save(list(cached.values()), partial)
        partial.replace(cache)
        key_file.write_text(json.dumps({"key": key, "settings": asdict(settings)}, indent=1, default=str))
        print(f"tokenized {len(missing)} {split} clips in {time.perf_counter() - t0:.0f}s "
              f"(cache now {len(cached)})", flush=True)
    return [cached[ref["file"]] for ref in refs]


def cache_settings(model_dir: Path):
    """The prepare settings of the tokenized training caches: the embedded model's preprocessing, one
    window per clip."""
    from operators.models.embedded import PREPROCESS
    from operators.prepare import PrepareSettings
    from pipelines.config import DEFAULT_PROMPT

    return PrepareSettings(model=str(model_dir), prompt=DEFAULT_PROMPT, fps=PREPROCESS["fps"],
                           max_pixels=PREPROCESS["max_pixels"], min_pixels=PREPROCESS["min_pixels"], window_s=30.0)


def tokenization_key(settings, model_dir: Path) -> str:
    """What cached model inputs depend on: the prepare settings (except where the processor was loaded from)
    and the bytes of the processor's files (tokenizer, chat template, image/video/audio settings). Which
    files those are is what the processor saves, so a model directory's weights and config stay out of the
    key and a model trained next to the cache (same processor files) matches it."""
    from transformers import AutoProcessor  # not the job's cached loader: the files may have just changed

    digest = hashlib.sha256(json.dumps({k: v for k, v in asdict(settings).items() if k != "model"},
                                       sort_keys=True, default=str).encode())
    with tempfile.TemporaryDirectory() as saved:
        AutoProcessor.from_pretrained(str(model_dir)).save_pretrained(saved)
        # Read where the model keeps them (loading rewrites some of them); a hub id has only the saved copy.
        folder = Path(model_dir) if Path(model_dir).is_dir() else Path(saved)
        for name in sorted(p.name for p in Path(saved).iterdir() if p.is_file()):
            if (folder / name).is_file():
                digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()[:16]


def stored_tokenization_key(folder: Path) -> str | None:
    """The key recorded next to a folder's tokenized.pt (None for caches made before keys were)."""
    key_file = Path(folder) / KEY_FILE
    return json.loads(key_file.read_text()).get("key") if key_file.exists() else None


def _compact(item: dict) -> dict:
    """Keep pixels and Whisper features in float16 (half the RAM); batches turn them back into float32."""
    inputs = {k: (v.half() if v.is_floating_point() and k != "video_second_per_grid" else v.clone())
              for k, v in item["inputs"].items()}
    return {**item, "inputs": inputs}


def epoch_batches(lengths: list[int], batch_size: int, pool: int, rng: random.Random,
                  repeats: list[int] | None = None, groups: list[int] | None = None) -> list[list[int]]:
    """One epoch over the items (by index) in batches of similar length: shuffle, sort each run of
    pool * batch_size items by length, cut the runs into batches, shuffle the batches.

    repeats[i] (default 1) is how often item i comes per epoch. The epoch is made of passes (pass p holds
    the items with repeats > p), each shuffled and cut into runs on its own, so no batch holds an item twice.
    groups[i] (default all 0): a batch only holds items of one group (sound-alone clips apart from
    audio-visual ones, whose forward passes differ)."""
    if groups and len(set(groups)) > 1:
        batches = []
        for group in sorted(set(groups)):
            members = [i for i, g in enumerate(groups) if g == group]
            part = epoch_batches([lengths[i] for i in members], batch_size, pool, rng,
                                 [repeats[i] for i in members] if repeats else None)
            batches += [[members[j] for j in batch] for batch in part]
        rng.shuffle(batches)
        return batches
    repeats = repeats or [1] * len(lengths)
    run = max(1, pool) * batch_size
    batches = []
    for p in range(max(repeats, default=0)):
        order = [i for i, r in enumerate(repeats) if r > p]
        rng.shuffle(order)
        for start in range(0, len(order), run):
            chunk = sorted(order[start:start + run], key=lengths.__getitem__)
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def caption_ids(tokenizer, caption: str) -> torch.Tensor:
    """The token ids a model is trained to produce for a caption: the caption, then <|im_end|>."""
    return torch.tensor(tokenizer.encode(caption) + [tokenizer.convert_tokens_to_ids("<|im_end|>")])


def attach_enumeration_targets(items: list[dict], tokenizer) -> None:
    """Each item's enumeration targets (targets.enumeration_targets), one row per caption_ids token."""
    from operators.synth import targets

    for item in items:
        encoded = tokenizer(item["caption"], return_offsets_mapping=True)
        if encoded["input_ids"] != tokenizer.encode(item["caption"]):
            raise RuntimeError(f"{item['file']}: offsets tokenization differs from caption_ids'")
        pairs, count = targets.enumeration_targets(item["caption"], [end for _, end in encoded["offset_mapping"]])
        item["enumeration_targets"] = (torch.from_numpy(pairs), torch.from_numpy(count))


def training_batch(items: list[dict], tokenizer, pad_id: int) -> dict:
    """Right-padded prompt + caption + <|im_end|>; loss only on the caption and the end token."""
    with_video = {has_video(it) for it in items}
    if len(with_video) > 1:  # transformers' forward takes one use_audio_in_video for the whole batch
        raise ValueError("a training batch mixes sound-alone and audio-visual clips (epoch_batches' groups)")
    seqs, labels = [], []
    for item in items:
        prompt = item["inputs"]["input_ids"].reshape(-1)
        target = caption_ids(tokenizer, item["caption"])
        seqs.append(torch.cat([prompt, target]))
        labels.append(torch.cat([torch.full_like(prompt, -100), target]))
    length = max(len(s) for s in seqs)
    ids = torch.full((len(items), length), pad_id)
    lab = torch.full((len(items), length), -100)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for b, (s, lbl) in enumerate(zip(seqs, labels)):
        ids[b, :len(s)], lab[b, :len(s)], mask[b, :len(s)] = s, lbl, 1
    ins = [it["inputs"] for it in items]
    features, feature_mask = audio_batch(items)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": lab,
             "input_features": features, "feature_attention_mask": feature_mask}
    if with_video == {True}:
        batch.update(pixel_values_videos=torch.cat([x["pixel_values_videos"] for x in ins]).float(),
                     video_grid_thw=torch.cat([x["video_grid_thw"] for x in ins]),
                     video_second_per_grid=torch.cat([x["video_second_per_grid"] for x in ins]),
                     use_audio_in_video=True)
    return batch


def has_video(item: dict) -> bool:
    return "video_grid_thw" in item["inputs"]


def attach_targets(items: list[dict], model) -> None:
    """Per-token encoder targets for each cached window, from the clip's spec (name -> spec); the audio
    token count comes from the model's own audio tower."""
    from operators.synth import targets

    output_lengths = model.model.audio_tower._get_feat_extract_output_lengths
    for item in items:
        spec = targets.spec_for_file(item["file"])
        if has_video(item):
            item["vision_targets"] = torch.from_numpy(targets.vision_targets(spec, item["inputs"]["video_grid_thw"][0]))
        n_audio = int(output_lengths(item["inputs"]["feature_attention_mask"].sum(-1))[1].sum())
        item["audio_targets"] = torch.from_numpy(targets.audio_targets(spec, n_audio))


class EncoderProbe(torch.nn.Module):
    """Training-only heads that read the vision and audio towers' outputs (via forward hooks) and score
    them against the per-token targets. Not part of the saved model."""

    def __init__(self, model, hidden: int):
        super().__init__()
        from operators.synth.targets import AUDIO_CLASSES, VISION_CLASSES

        self.vision_heads = torch.nn.ModuleList(torch.nn.Linear(hidden, len(c)) for c in VISION_CLASSES.values())
        self.audio_head = torch.nn.Linear(hidden, len(AUDIO_CLASSES))
        self.seen: dict[str, torch.Tensor] = {}
        model.model.visual.register_forward_hook(lambda m, a, out: self.seen.__setitem__("video", out.pooler_output))
        model.model.audio_tower.register_forward_hook(
            lambda m, a, out: self.seen.__setitem__("audio", out.last_hidden_state))

    def loss(self, items: list[dict]) -> torch.Tensor:
        """The encoder loss of the forward pass just run on `items` (joint_loss clears what earlier passes
        left, so a batch of sound alone, where the vision tower does not run, finds no video here)."""
        video, audio = self.seen.pop("video", None), self.seen.pop("audio")
        v_target = [it["vision_targets"] for it in items if "vision_targets" in it]
        a_target = torch.cat([it["audio_targets"] for it in items])
        if (video is None) != (not v_target) or audio.shape[0] != a_target.shape[0] or \
                video is not None and video.shape[0] != sum(len(t) for t in v_target):
            raise RuntimeError(f"encoder targets do not line up: video {None if video is None else video.shape[0]} "
                               f"vs {sum(len(t) for t in v_target)}, audio {audio.shape[0]} vs {a_target.shape[0]}")
        loss = self.audio_loss(audio, a_target)
        return loss if video is None else loss + self.vision_loss(video, torch.cat(v_target))

    def audio_loss(self, audio: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(self.audio_head(audio).float(), target)

    def vision_loss(self, video: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(torch.nn.functional.cross_entropy(head(video).float(), target[:, k])
                   for k, head in enumerate(self.vision_heads)) / len(self.vision_heads)


class EnumerationProbe(torch.nn.Module):
    """Training-only heads on the language model's hidden states (via a forward hook on its output, or on
    decoder layer `layer`'s): at each caption position, the attribute pairs of the visual objects still to
    be named (multi-label) and how many there are. Read only on full-stream steps (training_batch's
    layout). Not part of the saved model."""

    def __init__(self, model, hidden: int, layer: int = -1):
        super().__init__()
        from operators.synth.targets import ENUMERATION_CLASSES, ENUMERATION_PAIRS, MAX_OBJECTS

        self.n_pair_groups = len(ENUMERATION_PAIRS)
        self.pairs_head = torch.nn.Linear(hidden, len(ENUMERATION_CLASSES))
        self.count_head = torch.nn.Linear(hidden, MAX_OBJECTS + 1)
        self.seen: dict[str, torch.Tensor] = {}
        language_model = model.model.language_model
        if not -1 <= layer < len(language_model.layers):
            raise ValueError(f"enumeration layer {layer} does not exist: the language model has "
                             f"{len(language_model.layers)} decoder layers (0-based; -1 = its output)")

        def record(module, args, out):
            if module.training:  # validation's generate passes need no targets
                self.seen["text"] = out.last_hidden_state if layer < 0 else out

        (language_model if layer < 0 else language_model.layers[layer]).register_forward_hook(record)

    def loss(self, items: list[dict]) -> torch.Tensor:
        hidden = self.seen.pop("text")
        rows, pairs, count = [], [], []
        for b, item in enumerate(items):
            item_pairs, item_count = item["enumeration_targets"]
            first = item["inputs"]["input_ids"].numel() - 1  # the last prompt position predicts caption token 0
            rows.append(hidden[b, first:first + len(item_count)])
            pairs.append(item_pairs)
            count.append(item_count)
        rows, pairs, count = torch.cat(rows).float(), torch.cat(pairs), torch.cat(count)
        # Summed over each pair group's classes, so a sparse multi-hot weighs about as much as the count.
        pair_loss = torch.nn.functional.binary_cross_entropy_with_logits(
            self.pairs_head(rows), pairs, reduction="none").sum(-1).mean() / self.n_pair_groups
        return (pair_loss + torch.nn.functional.cross_entropy(self.count_head(rows), count)) / 2


def frame_pair(item: dict, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Temporal patch g of a cached window as its own one-step video: (pixels, grid_thw, vision targets).
    Patches are ordered time-major, so frame pair g is one contiguous block of rows."""
    t, h, w = (int(v) for v in item["inputs"]["video_grid_thw"][0])
    patches, tokens = h * w, len(item["vision_targets"]) // t
    return (item["inputs"]["pixel_values_videos"][g * patches:(g + 1) * patches], torch.tensor([[1, h, w]]),
            item["vision_targets"][g * tokens:(g + 1) * tokens])


def has_vision_warmup(cfg: TrainConfig) -> bool:
    return cfg.vision_warmup_steps > 0 or cfg.vision_warmup_minutes > 0


def autocast(enabled: bool):
    """bfloat16 autocast on CPU when enabled (TrainConfig.bf16_autocast), else a no-op."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.Tensor]) -> None:
    """One update as every training stage makes it: gradients clipped to norm 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def warmup_loss(model, probe: EncoderProbe, chosen: list[tuple], bf16_autocast: bool) -> torch.Tensor:
    """Loss of one vision warm-up step on frame pairs (frame_pair's tuples): the tower's output, read by
    the probe's vision heads, against the per-token targets."""
    pixels = torch.cat([c[0] for c in chosen]).float()
    grid = torch.cat([c[1] for c in chosen])
    with autocast(bf16_autocast):
        model.model.get_video_features(pixels, grid)  # the probe's hook keeps the tower's output
        return probe.vision_loss(probe.seen.pop("video"), torch.cat([c[2] for c in chosen]))


def vision_warmup(model, probe: EncoderProbe, items: list[dict], cfg: TrainConfig, rng: random.Random) -> int:
    """The vision tower and the probe's vision heads alone, on the per-token targets, for
    cfg.vision_warmup_steps or cfg.vision_warmup_minutes, whichever is set and reached first, in batches
    of cfg.vision_warmup_frames frame pairs from different clips. Returns the steps done."""
    params = list(model.model.visual.parameters()) + list(probe.vision_heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pairs = [(i, g) for i, it in enumerate(items) if has_video(it)
             for g in range(int(it["inputs"]["video_grid_thw"][0, 0]))]
    start, step = time.perf_counter(), 0

    def progress() -> float:  # share of the warm-up done: by steps, by minutes, or the further of the two
        by_steps = step / cfg.vision_warmup_steps if cfg.vision_warmup_steps > 0 else 0.0
        by_time = (time.perf_counter() - start) / (60 * cfg.vision_warmup_minutes) \
            if cfg.vision_warmup_minutes > 0 else 0.0
        return max(by_steps, by_time)

    while has_vision_warmup(cfg) and progress() < 1:
        if cfg.vision_warmup_anneal:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg, progress())
        chosen = [frame_pair(items[i], g) for i, g in rng.sample(pairs, min(cfg.vision_warmup_frames, len(pairs)))]
        loss = warmup_loss(model, probe, chosen, cfg.bf16_autocast)
        optimizer_step(opt, loss, params)
        step += 1
        if step % 50 == 0:
            print(f"vision warm-up step {step} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e}", flush=True)
    return step


def audio_batch(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The items' Whisper features, right-padded to the longest, and their masks (as the job collates them)."""
    ins = [it["inputs"] for it in items]
    frames = max(int(x["input_features"].shape[-1]) for x in ins)
    pad = lambda t: torch.nn.functional.pad(t, (0, frames - t.shape[-1]))  # noqa: E731
    return (torch.cat([pad(x["input_features"]) for x in ins]).float(),
            torch.cat([pad(x["feature_attention_mask"]) for x in ins]))


def audio_warmup(model, probe: EncoderProbe, items: list[dict], cfg: TrainConfig, rng: random.Random) -> int:
    """The audio tower and the probe's audio head alone, on the per-token targets, for
    cfg.audio_warmup_steps steps of cfg.audio_warmup_clips whole clips. Returns the steps done."""
    params = list(model.model.audio_tower.parameters()) + list(probe.audio_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.audio_warmup_steps):
        chosen = rng.sample(items, min(cfg.audio_warmup_clips, len(items)))
        features, mask = audio_batch(chosen)  # outside autocast, which rejects torch.cat of float16
        with autocast(cfg.bf16_autocast):
            model.model.get_audio_features(features, mask)  # the probe's hook keeps the tower's output
            loss = probe.audio_loss(probe.seen.pop("audio"), torch.cat([it["audio_targets"] for it in chosen]))
        optimizer_step(opt, loss, params)
        if (step + 1) % 50 == 0:
            print(f"audio warm-up step {step + 1} loss {loss.item():.4f}", flush=True)
    return cfg.audio_warmup_steps


def cache_audio_outputs(model, items: list[dict], batch_size: int = 32, *, bf16_autocast: bool) -> None:
    """Each item's output of the fixed audio tower (bfloat16), for audio_from_cache. The tower attends
    within each clip's own windows, so clips batched together give the same output as clips run alone."""
    tower = model.model.audio_tower
    for p in tower.parameters():
        p.requires_grad_(False)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        features, mask = audio_batch(chunk)
        with torch.no_grad(), autocast(bf16_autocast):
            states = model.model.get_audio_features(features, mask).last_hidden_state
        lengths = tower._get_feat_extract_output_lengths(mask.sum(-1))[1]
        for item, rows in zip(chunk, states.to(torch.bfloat16).split(lengths.tolist())):
            item["audio_states"] = rows.clone()


@contextmanager
def audio_from_cache(model, items: list[dict]):
    """Within this block the audio tower returns the items' cached outputs (cache_audio_outputs), in the
    items' order, whatever features it is given; its forward hooks (the probe's) still run."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    tower = model.model.audio_tower
    # Stored in bfloat16 to save memory; handed on in the tower's own dtype, as its forward would.
    states = torch.cat([it["audio_states"] for it in items]).to(next(tower.parameters()).dtype)
    tower.forward = lambda *args, **kwargs: BaseModelOutputWithPooling(last_hidden_state=states)
    try:
        yield
    finally:
        del tower.forward  # back to the class's own forward


def freeze_vision_tower(model) -> list[str]:
    """Fix the tower's weights except the merger (the projection into the language model). Returns the
    names of the frozen parameters."""
    frozen = []
    for name, param in model.model.visual.named_parameters():
        if not name.startswith("merger."):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def cache_tower_outputs(model, items: list[dict], batch_size: int = 16, *, bf16_autocast: bool) -> None:
    """Replace each item's pixels by what the fixed tower's blocks make of them (bfloat16, in the
    processor's patch order), so joint steps run only the merger (see tower_from_cache). The blocks
    attend within a frame pair, so clips batched together give the same output as clips run alone."""
    visual = model.model.visual
    unit = visual.spatial_merge_size ** 2
    items = [it for it in items if has_video(it)]
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pixels = torch.cat([it["inputs"]["pixel_values_videos"] for it in chunk]).float()
        grid = torch.cat([it["inputs"]["video_grid_thw"] for it in chunk])
        with torch.no_grad(), autocast(bf16_autocast):
            out = visual(pixels, grid_thw=grid)
        # The blocks' output is in window order (merge units regrouped); the merger's output comes back
        # in patch order, so the permutation that undoes it also undoes the blocks'.
        window = out.last_hidden_state.reshape(-1, unit, out.last_hidden_state.shape[-1])
        patch_order = window[torch.argsort(_window_order(visual, grid))].reshape(-1, window.shape[-1])
        sizes = [int(it["inputs"]["video_grid_thw"].prod()) for it in chunk]
        for item, states in zip(chunk, patch_order.to(torch.bfloat16).split(sizes)):
            item["inputs"] = {**item["inputs"], "pixel_values_videos": states.clone()}


def _window_order(visual, grid: torch.Tensor) -> torch.Tensor:
    """The merge-unit order the tower's window attention runs in, from transformers' own helper (so it cannot drift)."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as omni

    index, _ = omni.get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                            window_size=visual.window_size, patch_size=visual.patch_size)
    return index


@contextmanager
def tower_from_cache(model):
    """Within this block the tower takes cache_tower_outputs' states instead of pixels: no patch
    embedding, no blocks; window order, merger and the return to patch order run as usual."""
    visual = model.model.visual
    saved = visual.patch_embed, visual.blocks
    visual.patch_embed, visual.blocks = torch.nn.Identity(), torch.nn.ModuleList()
    try:
        yield
    finally:
        visual.patch_embed, visual.blocks = saved


def keep_sets(state, items: list[dict], cfg: TrainConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """Per sample: its text plus a share r ~ U(prune_min_retention, prune_max_retention) of its audio/video tokens.

    Usually ("informed") the tokens the clip's spec marks as carrying something (an object on screen, a
    sound playing) go first, in random order, then background: the kind of set a good pruner keeps, so
    the captioner learns to read sparse, position-gapped streams. Otherwise a uniform random share, so it
    also learns what to say when evidence is missing. Kept tokens keep their original positions."""
    from operators.models.decoder import AUDIO, VIDEO

    keep = []
    for b, item in enumerate(items):
        media = state.media_indices(b)
        modality = state.modality[b, media]
        informative = torch.zeros(media.numel())
        video_flags = item["vision_targets"][:, 0] > 0 if "vision_targets" in item else torch.zeros(0, dtype=torch.bool)
        for code, flags in ((VIDEO, video_flags), (AUDIO, item["audio_targets"].any(-1))):
            rows = modality == code
            if int(rows.sum()) != flags.numel():
                raise RuntimeError(f"{item['file']}: {int(rows.sum())} tokens of modality {code} vs "
                                   f"{flags.numel()} targets")
            informative[rows] = flags.float()
        low, high = cfg.prune_min_retention, cfg.prune_max_retention
        share = low + (high - low) * float(torch.rand((), generator=gen))
        k = max(1, round(share * media.numel()))
        noise = torch.rand(media.numel(), generator=gen)
        informed = float(torch.rand((), generator=gen)) < cfg.prune_informed
        priority = informative + 0.9 * noise if informed else noise
        keep.append(torch.cat([state.text_indices(b), media[torch.topk(priority, k).indices]]))
    return keep


def pruned_caption_loss(thinker, batch: dict, items: list[dict], cfg: TrainConfig,
                        gen: torch.Generator) -> torch.Tensor:
    """Caption loss after dropping tokens with keep_sets (encoders and LLM all train); `batch` is
    thinker.collate of the items' inputs."""
    emb = thinker.embed(batch, grad=True)
    targets = [caption_ids(thinker.processor.tokenizer, it["caption"]) for it in items]
    state = emb.state.gather(keep_sets(emb.state, items, cfg, gen))
    return thinker.decoder.caption_loss(state, targets, thinker.pad_token_id)


def joint_loss(thinker, probe: EncoderProbe | None, items: list[dict], cfg: TrainConfig,
               prune_gen: torch.Generator | None, *, vision_frozen: bool, audio_frozen: bool,
               enumeration: EnumerationProbe | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption loss and weighted auxiliary loss of one joint step on `items`: the full token stream, or,
    given prune_gen, a pruning-aware step (pruned_caption_loss). The auxiliary loss is cfg.aux_weight
    times the encoder-target loss (zero without a probe), plus, on full-stream steps, cfg.enumeration_weight
    times the enumeration probe's loss. With the vision or audio tower frozen, the items' cached tower
    outputs stand in for it."""
    model, tokenizer = thinker.model, thinker.processor.tokenizer
    if probe:
        probe.seen.clear()  # what validation's generate or the last step left behind
    # Batches are built outside autocast: CPU autocast rejects torch.cat of the float16 cache.
    if prune_gen is not None:
        batch = thinker.collate([it["inputs"] for it in items])
    else:
        batch = training_batch(items, tokenizer, tokenizer.pad_token_id)
    with autocast(cfg.bf16_autocast), \
            (tower_from_cache(model) if vision_frozen else nullcontext()), \
            (audio_from_cache(model, items) if audio_frozen else nullcontext()):
        if prune_gen is not None:
            loss = pruned_caption_loss(thinker, batch, items, cfg, prune_gen)
        else:
            loss = model(**batch).loss
        aux = cfg.aux_weight * probe.loss(items) if probe else torch.zeros(())
        if enumeration is not None and prune_gen is None:
            aux = aux + cfg.enumeration_weight * enumeration.loss(items)
    return loss, aux


def lr_at(step: int, cfg: TrainConfig, time_progress: float = 0.0) -> float:
    """Warm-up, then cosine decay to min_lr by the last step or by the time budget, whichever comes first
    (so a run cut short by --max-minutes still ends at a low learning rate)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cosine_lr(cfg, max((step - cfg.warmup) / max(1, cfg.steps - cfg.warmup), time_progress))


def cosine_lr(cfg: TrainConfig, progress: float) -> float:
    """cfg.lr at progress 0, falling along a half cosine to cfg.min_lr at progress 1 (and after)."""
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def validate(model, processor, items: list[dict], max_new_tokens: int = 96) -> dict:
    """Greedy captions through the inference adapter, scored with the world's fact F1."""
    from operators.metrics import corpus_fact_f1
    from operators.models.qwen2_5_omni import OmniThinker

    model.eval()
    thinker = OmniThinker.from_loaded(model, processor, "cpu")
    preds = {}
    for i in range(0, len(items), 16):
        chunk = items[i:i + 16]
        for item, result in zip(chunk, thinker.caption([it["inputs"] for it in chunk], max_new_tokens)):
            preds[item["file"]] = result["caption"]
    model.train()
    scores = corpus_fact_f1(preds, {it["file"]: it["facts"] for it in items},
                            {it["file"]: it["fact_modalities"] for it in items})
    scores["example"] = preds[items[0]["file"]]
    return scores


def load_val_items(cfg: TrainConfig, split: str, model_dir: Path) -> list[dict]:
    """A validation split's tokenized items with their reference facts, for validate."""
    items = tokenize_split(cfg, split, model_dir)
    with (_split_dir(cfg, split) / "references.jsonl").open() as lines:
        refs = {ref["file"]: ref for ref in map(json.loads, lines)}
    for item in items:
        item.update(facts=refs[item["file"]]["facts"], fact_modalities=refs[item["file"]]["fact_modalities"])
    return items


def start_model(cfg: TrainConfig, tokenizer):
    """The model training starts from: cfg.init_from's weights in float32, or new_model's."""
    if not cfg.init_from:
        return new_model(cfg, tokenizer)
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(cfg.init_from, dtype=torch.float32)


def new_model(cfg: TrainConfig, tokenizer):
    """A freshly initialised thinker of the configured size (seeded by the caller)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from operators.models.embedded import tiny_thinker_config

    config = tiny_thinker_config(tokenizer, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                                 kv_heads=cfg.kv_heads, vision_hidden=cfg.vision_hidden,
                                 vision_depth=cfg.vision_depth)
    return Qwen2_5OmniThinkerForConditionalGeneration(config)


def train(cfg: TrainConfig) -> dict:
    from operators.models.embedded import write_model_card
    from operators.models.qwen2_5_omni import OmniThinker
    from operators.synth import targets

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    make_splits(cfg)
    model_dir = Path(cfg.work) / "model"
    processor = build_model_dir(cfg, model_dir)
    train_items = tokenize_split(cfg, "train", model_dir)
    if cfg.n_train_sound:
        train_items += tokenize_split(cfg, "train" + SOUND_SUFFIX, model_dir)
    val_sets = {name: load_val_items(cfg, split, model_dir)
                for name, split in (("val", "val"), ("val_sound", "val" + SOUND_SUFFIX)) if split_sizes(cfg)[split]}

    model = start_model(cfg, processor.tokenizer)
    if cfg.sync_rope:
        from operators.models.rope import install_sync_rope

        install_sync_rope(model)
    model.train()
    if cfg.aux_weight > 0 or cfg.prune_fraction > 0:
        attach_targets(train_items, model)
    enumeration = None
    if cfg.enumeration_weight > 0:
        attach_enumeration_targets(train_items, processor.tokenizer)
        enumeration = EnumerationProbe(model, cfg.hidden, cfg.enumeration_layer)
    thinker = OmniThinker.from_loaded(model, processor, "cpu")  # the inference path, for pruned steps
    prune_rng = random.Random(cfg.seed + 1)  # its own stream: the data order does not depend on it
    prune_gen = torch.Generator().manual_seed(cfg.seed)
    probe = EncoderProbe(model, cfg.hidden) if cfg.aux_weight > 0 else None
    params = list(model.named_parameters()) + [p for m in (probe, enumeration) if m for p in m.named_parameters()]
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    rng = random.Random(cfg.seed)
    warmup_steps = vision_warmup(model, probe, train_items, cfg, random.Random(cfg.seed + 2)) \
        if probe and has_vision_warmup(cfg) and not cfg.init_from else 0
    # Fixing a tower that never trained would hobble it; a fine-tuned model's tower has trained.
    vision_frozen = bool(cfg.freeze_vision and (warmup_steps or cfg.init_from))
    if vision_frozen:
        freeze_vision_tower(model)
        # A fixed tower gives each clip the same output every epoch: compute it once.
        cache_tower_outputs(model, train_items, bf16_autocast=cfg.bf16_autocast)
    audio_frozen = bool(probe and cfg.audio_warmup_steps)
    if audio_frozen:
        audio_warmup(model, probe, train_items, cfg, random.Random(cfg.seed + 3))
        cache_audio_outputs(model, train_items, bf16_autocast=cfg.bf16_autocast)
    lengths = [int(it["inputs"]["input_ids"].numel()) + len(caption_ids(processor.tokenizer, it["caption"]))
               for it in train_items]
    repeats = [max(1, len(targets.spec_for_file(it["file"]).objects)) for it in train_items] \
        if cfg.repeat_by_objects else None
    groups = [int(has_video(it)) for it in train_items]
    batches: list[list[int]] = []
    history, losses, pruned_losses, aux_losses = [], [], [], []
    train_start = time.perf_counter()
    deadline = train_start + cfg.max_minutes * 60  # the budget covers the training loop only
    step = 0
    for step in range(cfg.steps):
        if not batches:
            batches = epoch_batches(lengths, cfg.batch_size, cfg.length_pool, rng, repeats, groups)
        batch_items = [train_items[i] for i in batches.pop()]
        now = time.perf_counter()
        time_progress = (now - train_start) / (deadline - train_start) if cfg.max_minutes > 0 else 0.0
        lr = lr_at(step, cfg, time_progress)
        for group in opt.param_groups:
            group["lr"] = lr
        pruned = prune_rng.random() < cfg.prune_fraction
        loss, aux = joint_loss(thinker, probe, batch_items, cfg, prune_gen if pruned else None,
                               vision_frozen=vision_frozen, audio_frozen=audio_frozen, enumeration=enumeration)
        optimizer_step(opt, loss + aux, [p for _, p in params])
        (pruned_losses if pruned else losses).append(loss.item())
        aux_losses.append(aux.item())
        if (step + 1) % 50 == 0:
            elapsed = time.perf_counter() - start
            mean = lambda xs: sum(xs[-20:]) / max(1, len(xs[-20:]))  # noqa: E731
            print(f"step {step + 1} loss {mean(losses):.4f} pruned {mean(pruned_losses):.4f} "
                  f"aux {mean(aux_losses):.4f} lr {lr:.2e} elapsed {elapsed / 60:.1f} min", flush=True)
        if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:  # the last step's scores: "val" below
            history.append({"step": step + 1, **{name: validate(model, processor, items)
                                                   for name, items in val_sets.items()}})
            print(json.dumps(history[-1]), flush=True)
        if cfg.max_minutes > 0 and time.perf_counter() > deadline:
            print(f"time budget reached at step {step + 1}", flush=True)
            break
    final = {name: validate(model, processor, items) for name, items in val_sets.items()}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    if cfg.init_from:
        copy_model_files(cfg.init_from, out)
    else:
        processor.save_pretrained(out)
    report = {"train_config": asdict(cfg), "vision_warmup_steps": warmup_steps, "vision_frozen": vision_frozen,
              "audio_frozen": audio_frozen,
              "steps_done": step + 1,
              "minutes": round((time.perf_counter() - start) / 60, 1), **final, "history": history}
    write_model_card(out, status="trained on the synthetic world", extra=report)
    print(json.dumps({"saved": str(out), **{k: v for k, v in report.items() if k != "history"}}), flush=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    from pipelines.config import flat_parser

    return flat_parser(TrainConfig(), "avsieve train-captioner", __doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    train(TrainConfig(**vars(build_parser().parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
