"""avsieve's vLLM model classes: vLLM's Qwen2.5-Omni and Qwen3-Omni thinkers with transformers' positions.

Registered out of tree (`register`, named in pyproject.toml's `vllm.general_plugins` entry point, so every
vLLM process, engine core and workers included, knows it). What differs from stock vLLM 0.32:

- TMRoPE positions come from transformers' own `get_rope_index` (operators/models/positions.py). Stock
  vLLM re-implements it and, with audio-in-video, starts the interleaved positions one token late and
  does not give the bos/eos pairs shared positions (tests/test_vllm_engine.py shows where they differ).
- The prompt layout of audio-in-video (how many video and audio tokens each 2-s chunk gets) uses the
  processor's seconds per temporal grid step; stock vLLM uses a `second_per_grid_ts` processor kwarg
  that defaults to 1.0, which is right only at 2 frames per second.
- Weights load under the thinker's own names too (a thinker checkpoint has no `thinker.` prefix).

For Qwen3-Omni (`ExactQwen3OmniThinker`) stock vLLM's positions agreed with transformers' at 2 and 1
frames per second; they come from transformers all the same (one source of truth), and a window whose
time ids are not whole numbers (vLLM keeps integer positions) is refused. The audio-in-video kwarg is
translated as for Qwen2.5-Omni; the config keys vLLM reads under other names are set where the checkpoint
is wrapped (operators/models/qwen3_omni.vllm_config).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.model_executor.models.qwen2_5_omni_thinker import (
    Qwen2_5OmniThinkerDummyInputsBuilder,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2_5OmniThinkerMultiModalProcessor,
    Qwen2_5OmniThinkerProcessingInfo,
)
from vllm.model_executor.models.qwen3_omni_moe_thinker import (
    Qwen3OmniMoeThinkerDummyInputsBuilder,
    Qwen3OmniMoeThinkerForConditionalGeneration,
    Qwen3OmniMoeThinkerMultiModalProcessor,
    Qwen3OmniMoeThinkerProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessorKwargs

from operators.engines.vllm_checkpoint import (ARCHITECTURE, PRUNED_ARCHITECTURE, PRUNED_QWEN3_ARCHITECTURE,
                                               QWEN3_ARCHITECTURE, STOCK_POSITIONS_ARCHITECTURE)
from operators.models.positions import tmrope_positions


# transformers' processor spells audio-in-video `load_audio_from_video` from 5.23 on (older: use_audio_in_video).
_NEW_AUDIO_IN_VIDEO = "load_audio_from_video" in Qwen2_5OmniProcessorKwargs.__annotations__


def _audio_in_video_kwargs(hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> Mapping[str, object]:
    """transformers >= 5.23 names audio-in-video `load_audio_from_video` and wants to know which audio
    belongs to which video; vLLM 0.32 passes the older `use_audio_in_video` alone, which that processor
    takes for a standalone audio and rejects (0 audio placeholders for 1 audio). Both families' processors."""
    if hf_kwargs.get("use_audio_in_video") and hf_data.get("audio") and _NEW_AUDIO_IN_VIDEO:
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != "use_audio_in_video"}
        hf_kwargs.update(load_audio_from_video=True,
                         audio_from_video_indices=list(range(len(hf_data.get("videos") or []))))
    return hf_kwargs


class ExactOmniThinkerProcessor(Qwen2_5OmniThinkerMultiModalProcessor):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        return super()._call_hf_processor(hf_data, _audio_in_video_kwargs(hf_data, hf_kwargs))

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs) -> Sequence:
        seconds = out_mm_kwargs.get_data().get("second_per_grid_ts")
        if seconds is not None:  # the processor's own value for each video, at any fps
            hf_processor_mm_kwargs = {**hf_processor_mm_kwargs,
                                      "second_per_grid_ts": [float(s) for s in torch.as_tensor(seconds).flatten()]}
        return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)


def _feature(feature, key: str) -> torch.Tensor | None:
    item = feature.data.get(key) if feature.data is not None else None
    return None if item is None else torch.as_tensor(item.data)


@MULTIMODAL_REGISTRY.register_processor(ExactOmniThinkerProcessor, info=Qwen2_5OmniThinkerProcessingInfo,
                                        dummy_inputs=Qwen2_5OmniThinkerDummyInputsBuilder)
class ExactOmniThinker(Qwen2_5OmniThinkerForConditionalGeneration):
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "thinker.lm_head.": "language_model.lm_head.",
        "thinker.model.": "language_model.model.",
        "thinker.": "",
        "talker.": None,
        "token2wav.": None,
        "lm_head.": "language_model.lm_head.",  # a thinker checkpoint's own names
        "model.": "language_model.model.",
    })

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        return transformers_positions(self.config, input_tokens, mm_features)


def transformers_positions(config, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
    """(3, L) positions and the delta that continues them during decoding, from transformers' get_rope_index
    for the thinker `config`'s family."""
    features = sorted(mm_features, key=lambda f: f.mm_position.offset)
    videos = [f for f in features if f.modality == "video"]
    audios = [f for f in features if f.modality == "audio"]
    if len(videos) > 1 or len(audios) > 1 or any(f.modality == "image" for f in features):
        raise ValueError("avsieve's vLLM model takes one window per request: at most one video and its audio")
    grid = _feature(videos[0], "video_grid_thw").reshape(1, 3) if videos else None
    seconds = _feature(videos[0], "second_per_grid_ts") if videos else None
    audio_lengths = _feature(audios[0], "audio_feature_lengths").reshape(1) if audios else None
    ids = torch.tensor([input_tokens], dtype=torch.long)
    positions, delta = tmrope_positions(config, ids, grid, audio_lengths,
                                        seconds.reshape(1).float() if seconds is not None else None)
    return whole_positions(positions[:, 0], seconds), int(delta.reshape(-1)[0])


def whole_positions(positions: torch.Tensor, seconds: torch.Tensor | None) -> torch.Tensor:
    """Positions as vLLM holds them, whole numbers. Qwen3-Omni's come as floats; a frame pair spanning a
    whole number of ids can still come out a float's rounding error off one (14/13 s * 13 ids a second):
    that is the whole number. Anything further off is refused."""
    if not positions.is_floating_point():
        return positions
    whole = positions.round()
    if (positions - whole).abs().max() > 1e-3:
        raise ValueError("this window's time positions are not whole numbers (a video grid step of "
                         f"{float(seconds.reshape(-1)[0])} s): use --engine hf or another --fps")
    return whole.long()


class ExactQwen3OmniThinkerProcessor(Qwen3OmniMoeThinkerMultiModalProcessor):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        return super()._call_hf_processor(hf_data, _audio_in_video_kwargs(hf_data, hf_kwargs))


@MULTIMODAL_REGISTRY.register_processor(ExactQwen3OmniThinkerProcessor, info=Qwen3OmniMoeThinkerProcessingInfo,
                                        dummy_inputs=Qwen3OmniMoeThinkerDummyInputsBuilder)
class ExactQwen3OmniThinker(Qwen3OmniMoeThinkerForConditionalGeneration):
    """vLLM's Qwen3-Omni thinker (its weight names already include a thinker checkpoint's own) with
    transformers' positions."""

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        return transformers_positions(self.config, input_tokens, mm_features)


class StockPositionsOmniThinker(ExactOmniThinker):
    """For comparison only (benchmarks/engines.py): stock vLLM's positions, with everything else of
    ExactOmniThinker that the model needs to run here at all. What a vLLM user gets today."""

    get_mrope_input_positions = Qwen2_5OmniThinkerForConditionalGeneration.get_mrope_input_positions


def _enable_pruning_route_on_cpu() -> None:
    """vLLM 0.32's CPU runner loads a model without setting the flag its GPU runner sets for a model with
    SupportsMultiModalPruning (`is_multimodal_pruning_enabled`), so positions are never corrected after
    the encoders there. Set it after loading, by the GPU runner's rule (a no-op for every other model)."""
    try:
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # a build without the CPU runner
        return
    if getattr(CPUModelRunner.load_model, "avsieve_patched", False):
        return
    original = CPUModelRunner.load_model

    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = bool(supports_multimodal_pruning(self.get_model()) and mm_config
                                                  and mm_config.is_multimodal_pruning_enabled())

    load_model.avsieve_patched = True
    CPUModelRunner.load_model = load_model


def register() -> None:
    """vLLM plugin entry point: make the architectures resolvable in every vLLM process (imported lazily)."""
    from vllm import ModelRegistry

    _enable_pruning_route_on_cpu()

    for name, cls in ((ARCHITECTURE, "vllm_model:ExactOmniThinker"),
                      (QWEN3_ARCHITECTURE, "vllm_model:ExactQwen3OmniThinker"),
                      (STOCK_POSITIONS_ARCHITECTURE, "vllm_model:StockPositionsOmniThinker"),
                      (PRUNED_ARCHITECTURE, "vllm_pruning:PrunedOmniThinker"),
                      (PRUNED_QWEN3_ARCHITECTURE, "vllm_pruning:PrunedQwen3OmniThinker")):
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"operators.engines.{cls}")
