"""The vLLM engine: captions prepared windows with one vLLM `LLM` per caption actor.

What crosses the object store for this engine is the compact window (operators/tokenize.py
`pack_compact`): the decoded uint8 frames, the 16 kHz audio, the templated prompt, the processor
settings, and the HF processor's token ids for the same window. vLLM runs the model's own Hugging Face
processor on those inputs with the same settings, and each request's prompt token ids are checked
against the HF processor's before its caption is accepted: a window whose ids differ is an error row,
never a caption from another input. Positions come from transformers (operators/engines/vllm_model.py).

The engine runs in the actor's process (no engine-core subprocess), so an engine that dies takes its
actor with it: Ray restarts the actor and the crash journal (operators/caption.py) retries its windows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time

import torch

from operators import tokenize as tok
from operators.models.qwen2_5_omni import (eos_token_ids, load_model_config, load_processor, model_label,
                                           pick_device, pick_dtype)
from operators.models.qwen3_omni import is_qwen3_omni, whole_time_ids
from operators.pruning.flops import prefill_flops

log = logging.getLogger(__name__)

# Environment for an in-process engine on a CPU-only host (a GPU host ignores the CPU settings).
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process: its death is the actor's death
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache on a CPU host
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # a Ray actor shares its node's cores; do not pin them
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


class PromptMismatch(RuntimeError):
    """vLLM's processor produced other token ids than the HF processor did for the same window."""


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or installed without a usable torch
        return False
    return True


def unsupported_options(settings) -> list[str]:
    """What the vLLM engine cannot do with these caption settings (empty: it can run them)."""
    from operators.pruning import PRE_LLM_METHODS

    problems = []
    if settings.pruner not in ("none", *PRE_LLM_METHODS):
        problems.append(f"--pruner {settings.pruner} (it drops tokens between decoder layers, which only the HF "
                        "engine's decoder does; the vLLM engine runs " + ", ".join(PRE_LLM_METHODS) + ")")
    if settings.num_beams > 1:
        problems.append("--num-beams > 1 (beam search is the HF engine's)")
    if settings.no_repeat_sentences:
        problems.append("--no-repeat-sentences (a logits rule of the HF engine's decoder)")
    if settings.attn_implementation == "eager":
        problems.append("--attn-implementation eager")
    config = _model_config(settings.model)
    model_type = getattr(config, "model_type", None)
    if config is not None and not model_type.startswith("qwen2_5_omni") and not is_qwen3_omni(config):
        problems.append(f"--model {settings.model} (a {model_type} checkpoint; the vLLM engine runs Qwen2.5-Omni "
                        "and Qwen3-Omni thinkers)")
    if config is not None and is_qwen3_omni(config):
        if not whole_time_ids(config, load_processor(settings.model), settings.fps):
            problems.append(f"--fps {settings.fps} with a Qwen3-Omni model (its video time positions would not be "
                            "whole numbers, which vLLM cannot hold; 1 or 2 frames per second can)")
    return problems


def _model_config(model: str):
    """The checkpoint's config, or None where it cannot be read here (the job then reports that)."""
    from operators.models.qwen2_5_omni import ModelNotFoundError, resolve_model_source

    try:
        return load_model_config(resolve_model_source(model))
    except ModelNotFoundError:
        return None


class VllmCaptioner:
    """One vLLM engine over the thinker of `settings.model`; `caption(rows)` -> one result per row."""

    def __init__(self, settings, architecture: str | None = None, max_model_len: int | None = None,
                 engine_args: dict | None = None):
        """architecture: another registered model class (benchmarks); max_model_len: a shorter context
        than the model's (tests), which vLLM then enforces per request; engine_args: more vLLM engine
        arguments (benchmarks fix the KV-cache size with num_gpu_blocks_override)."""
        for key, value in ENGINE_ENV.items():
            os.environ.setdefault(key, value)
        from vllm import LLM

        from operators.engines.vllm_checkpoint import default_architecture, vllm_checkpoint

        self.settings = settings
        self.label = model_label(settings.model)
        self.pruner, self.retention, self.pruner_weights_version = None, 1.0, None
        self.last_kept = None  # what the model class kept of each window of the last batch (pruned runs)
        engine_args = dict(engine_args or {})
        config = load_model_config(settings.model)
        self.text_config = config.get_text_config()
        if settings.pruner != "none":
            engine_args.update(self._pruning(settings))
            architecture = architecture or default_architecture(config.model_type, pruned=True)
        device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.dtype, device)
        self.processor = load_processor(settings.model)
        tokenizer = self.processor.tokenizer
        self.eos_token_ids = eos_token_ids(tokenizer)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.processor.video_token)
        self.audio_token_id = tokenizer.convert_tokens_to_ids(self.processor.audio_token)
        self.max_model_len = max_model_len or engine_args.pop("max_model_len", None) or int(
            self.text_config.max_position_embeddings)
        # Qwen3-Omni: a window whose frame rate (after --max-frames) gives fractional time positions is refused
        # before it reaches the engine (the model class would raise inside it).
        self.whole_time_ids = (lambda fps: whole_time_ids(config, self.processor, fps)) \
            if is_qwen3_omni(config) else (lambda fps: True)
        with _private_rendezvous():
            self.llm = LLM(
                model=vllm_checkpoint(settings.model, architecture),
                dtype=str(self.dtype).removeprefix("torch."),
                max_model_len=self.max_model_len,
                limit_mm_per_prompt={"image": 0, "video": 1, "audio": 1},
                seed=settings.seed,
                enforce_eager=device == "cpu",  # nothing to capture on CPU; faster start
                mm_processor_cache_gb=0,  # every window is new: caching processed inputs only costs memory
                disable_log_stats=False,  # per-request timestamps for prefill_ms / generate_ms
                **engine_args,
            )

    def _pruning(self, settings) -> dict:
        """Set up the run's pre-LLM pruner (plans are made here, the keep inside the model class) and
        return the engine arguments that hand the method to avsieve's pruned model class."""
        from operators.engines.vllm_pruning import PRUNER_CONFIG_KEY, ROUTE_RATE
        from operators.models.qwen2_5_omni import resolve_model_source
        from operators.pruning import make_pruner, resolve_retention

        self.retention = resolve_retention(settings.pruner, settings.retention, self.text_config.num_hidden_layers)
        self.pruner = make_pruner(settings.pruner, self.retention, settings.budget, settings.budget_c_ref,
                                  weights=settings.pruner_weights, model_source=resolve_model_source(settings.model),
                                  model_version=settings.model_version,
                                  allow_foreign_weights=settings.allow_foreign_pruner_weights)
        self.pruner_weights_version = getattr(self.pruner, "weights_version", None)
        weights = getattr(self.pruner, "weights", None)
        spec = {"method": settings.pruner, "weights": str(weights.resolve()) if weights else None}
        # No prefix caching: where vLLM 0.32 finds a request's whole media span in its prefix cache it strips
        # the pixel and audio tensors before the model sees them, and a pruning model's encoder may still
        # run for it (seen: KeyError 'pixel_values_videos', benchmark grid, retention 0.2 after 0.4 on one
        # engine). Pruned windows share only their short text prefix, so the cache saves little here.
        return {"hf_overrides": {PRUNER_CONFIG_KEY: json.dumps(spec)}, "video_pruning_rate": ROUTE_RATE,
                "enable_prefix_caching": False}

    def _request(self, window: dict) -> dict:
        if window["frames"] is None:  # sound alone: the processor's own audio path, no video settings
            return {"prompt": window["prompt_text"], "multi_modal_data": {"audio": (window["audio"], tok.SAMPLE_RATE)}}
        if not self.whole_time_ids(window["fps"]):
            raise ValueError(f"a window sampled at {window['fps']:.3g} frames per second gets fractional time "
                             "positions on this Qwen3-Omni model, which vLLM cannot hold: use --engine hf")
        kwargs = {"fps": window["fps"], "size": window["size"], "use_audio_in_video": window["audio"] is not None}
        data = {"video": window["frames"]}
        if window["audio"] is not None:
            data["audio"] = (window["audio"], tok.SAMPLE_RATE)
        return {"prompt": window["prompt_text"], "multi_modal_data": data, "mm_processor_kwargs": kwargs}

    def _sampling(self, windows: list[dict]):
        from vllm import SamplingParams

        s = self.settings
        common = dict(max_tokens=s.max_new_tokens, stop_token_ids=self.eos_token_ids, detokenize=False)
        if s.temperature <= 0:
            return [SamplingParams(temperature=0.0, **common) for _ in windows]
        # One stream per window: (run seed, window content) -> the same caption in any batch.
        seeds = [int.from_bytes(hashlib.sha1(w["input_ids"].numpy().tobytes()).digest()[:4], "little")
                 for w in windows]
        return [SamplingParams(temperature=s.temperature, seed=s.seed * 1_000_003 + seed, **common)
                for seed in seeds]

    def _pruned_request(self, sample: dict) -> dict:
        """A window prepared as processor tensors, as a pruned request: K media slots, K from its plan."""
        from operators.engines.vllm_pruning import collapsed_prompt, window_item
        from operators.pruning.content import sample_signals
        from operators.pruning.window import kept_count, window_seed

        ids = sample["input_ids"].reshape(-1)
        media = torch.nonzero((ids == self.video_token_id) | (ids == self.audio_token_id)).flatten()
        plan = self.pruner.budget.plan(*sample_signals(sample))
        keep = kept_count(plan, *tok.token_counts(sample, self.video_token_id, self.audio_token_id))
        if keep == 0:  # vLLM takes no empty placeholder; the caption stage makes this an error row
            raise ValueError(f"the plan keeps no audio or video token of this window ({media.numel()} tokens at "
                             f"retention {plan.retention:.3f}): raise --retention or use --engine hf")
        seed = window_seed(sample)
        prompt = collapsed_prompt(ids, media, self.video_token_id)
        first = int(media[0])
        return {"input_ids": ids, "seed": seed, "plan": plan, "keep": keep,
                "prompt_ids": prompt[:first] + [self.video_token_id] * keep + prompt[first + 1:],
                "request": {"prompt_token_ids": prompt,
                            "multi_modal_data": {"video": window_item(sample, plan, seed, keep)}}}

    def caption(self, blobs: list[bytes]) -> list[dict]:
        if self.pruner is None:
            windows = [tok.unpack_compact(b) for b in blobs]
            requests = [self._request(w) for w in windows]
        else:
            windows = [self._pruned_request(tok.unpack(b)) for b in blobs]
            requests = [w["request"] for w in windows]
        t0 = time.perf_counter()
        try:
            outputs = self.llm.generate(requests, self._sampling(windows), use_tqdm=False)
        except Exception:
            # A window vLLM refuses fails before the engine runs and leaves nothing behind: the caption
            # stage retries window by window. Anything else leaves requests in an engine of unknown state,
            # which must not caption the next batch: end the process (Ray restarts the actor; the crash
            # journal retries its windows and marks a window that kills it twice).
            if self.llm.llm_engine.has_unfinished_requests():
                log.exception("vLLM engine failed mid-batch; restarting the caption actor")
                os._exit(70)
            raise
        wall = time.perf_counter() - t0
        prefill_share = _prefill_share(outputs)
        self.last_kept = self._kept(windows)
        results = []
        for window, output in zip(windows, outputs):
            expected = window["prompt_ids"] if "prompt_ids" in window else window["input_ids"].tolist()
            if list(output.prompt_token_ids) != expected:
                raise PromptMismatch(f"vLLM's processor made {len(output.prompt_token_ids)} prompt tokens where the "
                                     f"HF processor made {len(expected)} (or other ids): check the processor settings")
            kept = self.last_kept[len(results)] if self.last_kept else None
            results.append(self._result(window, output, kept, wall, prefill_share, len(windows)))
        return results

    def _kept(self, windows: list[dict]) -> list | None:
        """What the model class kept of each window of the batch (KeptWindow), or None unpruned."""
        if self.pruner is None:
            return None
        from operators.engines.vllm_pruning import kept_window

        return [kept_window(w["seed"], w["plan"]) for w in windows]

    def _result(self, window: dict, output, kept, wall: float, prefill_share: float | None, n: int) -> dict:
        ids = window["input_ids"]
        video, audio = tok.token_counts(window, self.video_token_id, self.audio_token_id)
        tokens = list(output.outputs[0].token_ids)
        if tokens and tokens[-1] in self.eos_token_ids:
            tokens = tokens[:-1]  # as in the HF engine: the end token is not part of the caption
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        layers = int(self.text_config.num_hidden_layers)
        prefill_s = wall * prefill_share if prefill_share is not None else None
        text_tokens = int(ids.numel()) - video - audio
        video_kept, audio_kept, extra_layers = video, audio, []
        if kept is not None:
            video_kept, audio_kept, extra_layers = kept.video, kept.audio, kept.extra_layer_tokens
        return {
            "caption": text.strip(),
            "text_tokens": text_tokens,
            "video_tokens": video,
            "audio_tokens": audio,
            "video_tokens_kept": video_kept,
            "audio_tokens_kept": audio_kept,
            # As in the HF engine: every layer's tokens, plus the full-length layers a scorer ran.
            "prefill_flops": prefill_flops([text_tokens + video_kept + audio_kept] * layers + extra_layers,
                                           self.text_config),
            "output_tokens": len(tokens),
            "caption_truncated": output.outputs[0].finish_reason == "length",
            # Call-level times split evenly across rows, as in the HF engine.
            "prefill_ms": 1000 * prefill_s / n if prefill_s is not None else None,
            "generate_ms": 1000 * (wall - (prefill_s or 0.0)) / n,
        }


@contextlib.contextmanager
def _private_rendezvous():
    """vLLM's one-process executor meets its (single) worker through a file store it names in the system
    temp folder and never removes: one file per engine start, so per actor restart. Name it in a private
    folder instead, removed once the engine is up (a one-rank group does not read it again)."""
    from vllm.v1.executor import uniproc_executor

    folder = tempfile.mkdtemp(prefix="avsieve-vllm-")
    original = uniproc_executor.get_file_store_init_method
    uniproc_executor.get_file_store_init_method = lambda: f"file://{folder}/rendezvous"
    try:
        yield
    finally:
        uniproc_executor.get_file_store_init_method = original
        shutil.rmtree(folder, ignore_errors=True)


def _prefill_share(outputs) -> float | None:
    """Fraction of a generate call spent until every request had its first token (None without stats)."""
    stats = [o.metrics for o in outputs if getattr(o, "metrics", None) is not None]
    if not stats or not all(s.first_token_ts and s.last_token_ts for s in stats):
        return None
    start = min(s.scheduled_ts or s.queued_ts for s in stats)
    end = max(s.last_token_ts for s in stats)
    first = max(s.first_token_ts for s in stats)
    return min(1.0, max(0.0, (first - start) / (end - start))) if end > start else 1.0
