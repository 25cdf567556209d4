"""TMRoPE position ids exactly as transformers computes them, for any engine.

Qwen2.5-Omni's positions (time, height, width per token; audio interleaved with video in 2-s chunks) are
computed by transformers' `get_rope_index`, a method of the thinker that reads only the thinker config.
Both engines call it through `tmrope_positions`, so they cannot drift apart: the HF engine for its
prefill, the vLLM engine's model class (operators/engines/vllm_model.py) instead of vLLM's own
re-implementation, which gets audio-in-video wrong (tests/test_vllm_positions.py).

Qwen3-Omni's thinker has its own get_rope_index (audio positions in audio time, float ids where a
video grid's time is fractional); the config's model_type picks which one runs.
"""

from __future__ import annotations

import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniPreTrainedModelForConditionalGeneration as _OmniBase,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoePreTrainedModelForConditionalGeneration as _Omni3Base,
)


class _RopeIndex:
    """The three transformers methods behind get_rope_index, bound to a bare thinker config."""

    get_rope_index = _OmniBase.get_rope_index
    get_llm_pos_ids_for_vision = _OmniBase.get_llm_pos_ids_for_vision
    get_chunked_index = _OmniBase.get_chunked_index

    def __init__(self, thinker_config):
        self.config = thinker_config
        self.spatial_merge_size = thinker_config.vision_config.spatial_merge_size


class _Qwen3RopeIndex(_RopeIndex):
    """The same for Qwen3-Omni's thinker (its own get_rope_index and helpers)."""

    get_rope_index = _Omni3Base.get_rope_index
    get_llm_pos_ids_for_vision = _Omni3Base.get_llm_pos_ids_for_vision
    get_chunked_index = _Omni3Base.get_chunked_index


def tmrope_positions(thinker_config, input_ids: torch.Tensor, video_grid_thw: torch.Tensor | None = None,
                     audio_seqlens: torch.Tensor | None = None, second_per_grids: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, B, L) position ids and (B, 1) rope deltas for token ids (B, L) of one kind of window.

    Audio counts as interleaved with the video (audio-in-video) when the window has both; that is the
    only layout avsieve's prompts use (operators/tokenize.py)."""
    from operators.models.qwen3_omni import is_qwen3_omni

    family = _Qwen3RopeIndex if is_qwen3_omni(thinker_config) else _RopeIndex
    if attention_mask is None:  # transformers' branch for windows without video (sound alone) needs one
        attention_mask = torch.ones_like(input_ids)
    return family(thinker_config).get_rope_index(
        input_ids,
        image_grid_thw=None,
        video_grid_thw=video_grid_thw,
        attention_mask=attention_mask,
        use_audio_in_video=video_grid_thw is not None and audio_seqlens is not None,
        audio_seqlens=audio_seqlens,
        second_per_grids=second_per_grids,
    )
