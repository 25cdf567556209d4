"""The caption job's configuration: one frozen dataclass; CLI flags and YAML keys are derived from it."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any

DEFAULT_PROMPT = "Describe what is seen and heard in this clip."

# Fields that change what a caption is; their hash keys a run (scheduled reprocessing skips on it).
CAPTION_DEFINING = ("model", "prompt", "fps", "max_frames", "max_pixels", "min_pixels", "window_s",
                    "max_new_tokens", "temperature", "seed", "pruner", "budget", "retention", "budget_c_ref", "dtype")
# Caption-defining fields added later: hashed only when not at their default, so that the hashes (and the
# skip decisions) of existing outputs stay valid. Their defaults reproduce what runs did before they existed.
CAPTION_DEFINING_IF_SET = ("max_prompt_tokens", "pruner_weights", "num_beams", "no_repeat_sentences")


@dataclass(frozen=True)
class CaptionConfig:
    input: str = ""  # folder, glob, fsspec URI or manifest (.parquet/.csv/.jsonl)
    output: str = ""  # fsspec URI of the output folder
    model: str = "embedded"  # HF id or local path of a Qwen2.5-Omni checkpoint; "embedded" = bundled model
    prompt: str = DEFAULT_PROMPT
    fps: float = 2.0
    max_frames: int = 64  # per window; fps is lowered for longer windows
    max_pixels: int | None = None  # per frame; None = the model's recommended value
    min_pixels: int | None = None
    window_s: float = 30.0  # longer inputs become several windows (Whisper features cover 30 s)
    max_new_tokens: int = 128  # rows record caption_truncated when a caption hits it
    temperature: float = 0.0  # 0 = greedy
    num_beams: int = 1  # > 1: beam search (deterministic; temperature must be 0)
    no_repeat_sentences: bool = False  # never end a sentence the caption already has (operators/models/repeats.py)
    seed: int = 0
    engine: str = "auto"  # hf | vllm | auto (vllm where installed, a GPU is there and the settings allow)
    batch_size: int = 4
    limit: int | None = None  # number of input files
    pruner: str = "none"
    pruner_weights: str | None = None  # trained pruners (echoingpixels, avex); None = the ones shipped with the model
    allow_foreign_pruner_weights: bool = False  # use weights trained for another captioner version (rows say so)
    budget: str = "fixed"
    retention: float | None = None  # compute budget in (0, 1]; None = the method's published default
    budget_c_ref: float | None = None  # adaptive budget's reference content level; None = calibrate on the run
    calibration_windows: int = 64  # windows sampled from the run to calibrate the adaptive budget
    # GPU / actor knobs (used by pipelines/ray_adapter.py only)
    gpus_per_actor: float | None = None  # None = 1 if the cluster has GPUs, else 0
    actors: int = 1  # minimum caption actors
    max_actors: int | None = None  # autoscale up to this many (default: actors)
    cpus_per_actor: float = 1.0
    prepare_cpus: float = 1.0
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    device: str = "auto"
    ray_address: str | None = None
    progress: bool = True
    # Reprocessing and robustness (see operators/resume.py and operators/isolate.py)
    recompute: bool = False  # caption every window again, even those already written under this config
    retry_errors: bool = False  # also retry deterministic errors (decode, missing, ...); transient ones always are
    max_prompt_tokens: int | None = None  # per window; None = the model's max_position_embeddings - max_new_tokens
    decode_timeout_s: float | None = None  # per-window decode deadline; runs decoding in a killable helper process

    def caption_key(self) -> dict:
        key = {name: getattr(self, name) for name in CAPTION_DEFINING}
        defaults = {f.name: f.default for f in fields(self)}
        key.update({name: getattr(self, name) for name in CAPTION_DEFINING_IF_SET
                    if getattr(self, name) != defaults[name]})
        if self.budget == "adaptive" and self.pruner != "none" and self.budget_c_ref is None:
            # The calibration sample decides the budget's reference level: a different size is another run.
            if self.calibration_windows != defaults["calibration_windows"]:
                key["calibration_windows"] = self.calibration_windows
        engine = self.resolved_engine()
        if engine != "hf":  # every row written before engines existed is an HF engine's: its hash stays
            key["engine"] = engine
        if self.pruner != "none":  # a trained pruner's captions depend on the weights it loads, not their path
            from operators.models.qwen2_5_omni import resolve_model_source
            from operators.pruning import weights_digest

            digest = weights_digest(self.pruner, self.pruner_weights, resolve_model_source(self.model))
            if digest:
                key["pruner_weights_sha1"] = digest
        return key

    def resolved_engine(self) -> str:
        """hf or vllm for this configuration on this machine (operators/engines.resolve_engine)."""
        return _resolve_engine(self)

    def config_hash(self) -> str:
        blob = json.dumps(self.caption_key(), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=64)
def _resolve_engine(config: "CaptionConfig") -> str:
    from operators.engines import resolve_engine
    from operators.engines.vllm import unsupported_options

    gpu = bool(config.gpus_per_actor) or _local_gpu()
    return resolve_engine(config.engine, unsupported_options(config), gpu)


def _local_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _parse_bool(text: str) -> bool:
    return str(text).lower() in ("1", "true", "yes", "on")


def _arg_type(field: dataclasses.Field):
    kind = str(field.type)
    if "bool" in kind:
        return _parse_bool
    if "float" in kind:
        return float
    if "int" in kind:
        return int
    return str


def flat_parser(defaults, prog: str, description: str) -> argparse.ArgumentParser:
    """--flag per field of a flat dataclass instance (the trainers' configs), typed by its default."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, value in dataclasses.asdict(defaults).items():
        kind = _parse_bool if isinstance(value, bool) else type(value)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    return parser


def build_parser(prog: str = "avsieve caption") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Caption videos (sound included) with Ray Data.")
    parser.add_argument("--config", help="YAML file whose keys mirror these flags (flags win)")
    for field in fields(CaptionConfig):
        flag = "--" + field.name.replace("_", "-")
        # Booleans: `--recompute` alone means true; `--progress false` still works.
        switch = {"nargs": "?", "const": True} if _arg_type(field) is _parse_bool else {}
        parser.add_argument(flag, dest=field.name, type=_arg_type(field), default=None,
                            help=f"default: {field.default!r}", **switch)
    return parser


def load_config(argv: list[str] | None = None) -> CaptionConfig:
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        import yaml

        with open(args.config) as f:
            raw = yaml.safe_load(f) or {}
        known = {f.name for f in fields(CaptionConfig)}
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name not in known:
                raise SystemExit(f"unknown key {key!r} in {args.config}")
            values[name] = value
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    config = CaptionConfig(**values)
    if not config.input or not config.output:
        raise SystemExit("both --input and --output are required (flags or config file)")
    if config.retention is not None and not 0.0 < config.retention <= 1.0:
        raise SystemExit("--retention must be in (0, 1]")
    if config.num_beams < 1:
        raise SystemExit("--num-beams must be at least 1")
    if config.num_beams > 1 and config.temperature > 0:
        raise SystemExit("--num-beams > 1 is beam search, which does not sample: drop --temperature")
    if config.decode_timeout_s is not None and config.decode_timeout_s <= 0:
        raise SystemExit("--decode-timeout-s must be positive")
    try:
        config.resolved_engine()  # before anything starts: vLLM missing, or settings only the HF engine runs
    except ValueError as err:
        raise SystemExit(str(err)) from None
    return config
