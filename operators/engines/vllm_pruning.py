"""Joint audio-visual token pruning inside vLLM: avsieve's pruned model class and its request layout.

vLLM sizes every request (prompt length, KV-cache blocks) from its prompt token ids before any model
runs, and its runner encodes items grouped by modality, so a video and its audio never meet in one
encoder call. Pruning the joint pool therefore takes a different request than stock vLLM's:

- One "window" item carries both streams. The request's `video` data is a dict of the HF processor's
  tensors (pixels, Whisper features, the unpruned prompt ids) plus the window's plan and seed, parsed
  as one item (`WindowDataParser`); vLLM runs no processor of its own on it.
- The prompt holds K media slots, K = the method's keep for the window's plan (`window.kept_count`),
  which every pre-LLM method fixes before the encoders run. Slots are all video placeholders: what
  enters the LLM at a slot is the embedding put there, whichever modality it came from.
- `embed_multimodal` runs both encoders, merges them in the interleaved order, and calls the method's
  keep decision (operators/pruning/window.py, the same `Pruner.select` the HF engine calls). It returns
  the K kept embeddings in original order with each one's original TMRoPE position appended in extra
  channels, which `recompute_mrope_positions` (vLLM's post-encoder position route, switched on by a
  `video_pruning_rate` that this class otherwise ignores) strips and writes into the request's
  positions. Text positions, and the decoding delta, are the unpruned sequence's: decoding continues at
  the unpruned next position, as in the HF engine.
- What each window kept is recorded in this process (`kept_window`) for the row fields; the engine
  runs in its actor's process (operators/engines/vllm.py ENGINE_ENV).
- Qwen3-Omni (`PrunedQwen3OmniThinker`): a kept video token also takes its DeepStack rows (the three vision
  levels added after decoder layers 0-2) along, appended to its embedding; vLLM's Qwen3 model splits them
  off into its DeepStack buffer at the token's slot, as for any video embedding. A kept audio token
  carries zero rows there (adding zero is what transformers does to non-video tokens).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from vllm.forward_context import set_forward_context
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning
from vllm.model_executor.models.qwen2_5_omni_thinker import (
    Qwen2_5OmniThinkerDummyInputsBuilder,
    Qwen2_5OmniThinkerMultiModalDataParser,
    Qwen2_5OmniThinkerMultiModalProcessor,
    Qwen2_5OmniThinkerProcessingInfo,
)
from vllm.model_executor.models.qwen3_omni_moe_thinker import (
    Qwen3OmniMoeThinkerDummyInputsBuilder,
    Qwen3OmniMoeThinkerMultiModalDataParser,
    Qwen3OmniMoeThinkerProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ModalityDataItems
from vllm.multimodal.processing import PromptReplacement

from operators.engines.vllm_model import (ExactOmniThinker, ExactOmniThinkerProcessor, ExactQwen3OmniThinker,
                                          ExactQwen3OmniThinkerProcessor, _feature, whole_positions)
from operators.models.decoder import AUDIO, TEXT, VIDEO
from operators.models.positions import tmrope_positions
from operators.pruning.budget import WindowBudget
from operators.pruning.window import ModelView, modality_codes, select_window

PRUNER_CONFIG_KEY = "avsieve_pruner"  # hf_overrides key: {"method": ..., "weights": ...} as JSON
# vLLM's post-encoder position route is on only when a video pruning rate is set; this class ignores the
# rate itself (each window's keep comes from avsieve's plan).
ROUTE_RATE = 0.5
# Positions ride in extra embedding channels as (p // BASE, p % BASE): both parts stay exact in bf16.
POSITION_BASE = 128
POSITION_CHANNELS = 6

WINDOW_REQUIRED = frozenset({"pixel_values_videos", "video_grid_thw", "video_second_per_grid", "window_input_ids",
                             "window_plan", "window_seed", "window_keep"})
WINDOW_OPTIONAL = frozenset({"input_features", "feature_attention_mask"})


@dataclass
class KeptWindow:
    media: torch.Tensor  # indices of the kept audio/video tokens in the unpruned prompt
    video: int
    audio: int
    extra_layer_tokens: list[int]


# (window seed, plan) -> what the encoder call kept. Entries stay (up to a bound) rather than being taken
# once: vLLM reuses a cached encoder output for a repeated window without calling the model again.
_KEPT: OrderedDict[tuple, KeptWindow] = OrderedDict()
KEPT_ENTRIES = 4096


def record_kept(seed: int, plan: WindowBudget, kept: KeptWindow) -> None:
    _KEPT[(seed, plan)] = kept
    _KEPT.move_to_end((seed, plan))
    while len(_KEPT) > KEPT_ENTRIES:
        _KEPT.popitem(last=False)


def kept_window(seed: int, plan: WindowBudget) -> KeptWindow:
    return _KEPT[(seed, plan)]


def window_item(sample: dict[str, torch.Tensor], plan: WindowBudget, seed: int, keep: int) -> dict[str, torch.Tensor]:
    """The request's `video` data for one window: the HF processor's tensors plus its plan."""
    item = {
        **(_video_part(sample) if "pixel_values_videos" in sample else NO_VIDEO),
        "window_input_ids": sample["input_ids"].reshape(1, -1).long(),
        "window_plan": torch.tensor([[plan.retention, plan.video_cap, plan.audio_cap, plan.audio_min]],
                                    dtype=torch.float64),
        "window_seed": torch.tensor([seed], dtype=torch.int64),
        "window_keep": torch.tensor([keep], dtype=torch.int64),
    }
    if "input_features" in sample:
        item["input_features"] = sample["input_features"].reshape(1, *sample["input_features"].shape[-2:])
        item["feature_attention_mask"] = sample["feature_attention_mask"].reshape(1, -1)
    return item


def _video_part(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"pixel_values_videos": sample["pixel_values_videos"],
            "video_grid_thw": sample["video_grid_thw"].reshape(1, 3),
            "video_second_per_grid": sample["video_second_per_grid"].reshape(1).float()}


# A window of sound alone still travels as the request's one "video" item (its slots are video
# placeholders): with no pixels and an all-zero grid, which the model reads as "no video".
NO_VIDEO = {"pixel_values_videos": torch.zeros((0, 0)), "video_grid_thw": torch.zeros((1, 3), dtype=torch.int64),
            "video_second_per_grid": torch.zeros(1)}


def _window_video(grid, seconds) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The window item's video grid (1, 3) and seconds per grid step (1,) as tmrope_positions takes them:
    (None, None) for a window of sound alone (NO_VIDEO's all-zero grid)."""
    grid = torch.as_tensor(grid).reshape(1, 3)
    if int(grid.prod()) == 0:
        return None, None
    return grid, torch.as_tensor(seconds).reshape(1).float()


def collapsed_prompt(input_ids: torch.Tensor, media: torch.Tensor, video_token_id: int) -> list[int]:
    """The request prompt: the unpruned ids with their one contiguous media span replaced by a single video
    placeholder, which vLLM expands to the window's K slots."""
    ids = input_ids.reshape(-1).tolist()
    first, last = int(media[0]), int(media[-1])
    if last - first + 1 != media.numel():
        raise ValueError("a window's audio and video tokens must form one contiguous span")
    return ids[:first] + [video_token_id] + ids[last + 1:]


def _window_fields(data: Mapping[str, torch.Tensor]) -> Mapping[str, MultiModalFieldConfig]:
    grid = data.get("video_grid_thw", torch.empty((0, 3)))
    fields = {name: MultiModalFieldConfig.batched("video", keep_on_cpu=True)
              for name in (WINDOW_REQUIRED | WINDOW_OPTIONAL) - {"pixel_values_videos", "input_features"}}
    fields["pixel_values_videos"] = MultiModalFieldConfig.flat_from_sizes("video", grid.prod(-1))
    fields["input_features"] = MultiModalFieldConfig.batched("video")
    return fields


class WindowItems(ModalityDataItems):
    """Prepared windows: processor tensors that go to the model as they are (no processor call). Not
    vLLM's DictEmbeddingItems, which stands for precomputed embeddings: these are the encoders' inputs."""

    def __init__(self, data: Mapping[str, torch.Tensor]):
        from transformers.feature_extraction_utils import BatchFeature

        missing = WINDOW_REQUIRED - data.keys()
        if missing:
            raise ValueError(f"a prepared window needs {sorted(missing)}")
        super().__init__(data, "video")
        self._kwargs = MultiModalKwargsItems.from_hf_inputs(BatchFeature(dict(data)), _window_fields(data))

    def get_count(self) -> int:
        return len(self._kwargs["video"])

    def get(self, index: int):
        return self._kwargs["video"][index].get_data()

    def get_processor_data(self) -> Mapping[str, object]:
        return {}

    def get_passthrough_data(self) -> Mapping[str, object]:
        return self.data


class _WindowParsing:
    def _parse_video_data(self, data):
        if isinstance(data, dict) and "window_input_ids" in data:
            return WindowItems(data)
        return super()._parse_video_data(data)


class WindowDataParser(_WindowParsing, Qwen2_5OmniThinkerMultiModalDataParser):
    pass


class Qwen3WindowDataParser(_WindowParsing, Qwen3OmniMoeThinkerMultiModalDataParser):
    pass


class _WindowInfo:
    parser: type

    def get_data_parser(self):
        extractor = self.get_feature_extractor()
        return self.parser(spatial_merge_size=self.get_hf_config().vision_config.spatial_merge_size,
                           target_sr=extractor.sampling_rate, target_channels=self.get_target_channels(),
                           expected_hidden_size=self._get_expected_hidden_size(),
                           allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)


class WindowProcessingInfo(_WindowInfo, Qwen2_5OmniThinkerProcessingInfo):
    parser = WindowDataParser


class Qwen3WindowProcessingInfo(_WindowInfo, Qwen3OmniMoeThinkerProcessingInfo):
    parser = Qwen3WindowDataParser


def media_token_ids(config) -> tuple[int, int]:
    """(video, audio) placeholder ids of a Qwen2.5-Omni or Qwen3-Omni thinker config."""
    video = getattr(config, "video_token_index", None)
    audio = getattr(config, "audio_token_index", None)
    return (config.video_token_id if video is None else video), (config.audio_token_id if audio is None else audio)


class _WindowRequests:
    """Takes prepared windows (`window_item`) as they are; anything else as the family's exact processor."""

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        if "window_input_ids" in hf_inputs:
            return _window_fields(hf_inputs)
        return super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)

    def _postprocess_hf_mm_data(self, hf_data, hf_kwargs, processed_data):
        if "window_input_ids" in processed_data:
            return processed_data  # the prepared tensors, untouched
        return super()._postprocess_hf_mm_data(hf_data, hf_kwargs, processed_data)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs) -> Sequence:
        items = out_mm_kwargs.get("video", [])
        if not items or "window_keep" not in items[0].get_data():
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        video_token_id, _ = media_token_ids(self.info.get_hf_config())
        keeps = [int(item.get_data()["window_keep"]) for item in items]
        return [PromptReplacement(modality="video", target=[video_token_id],
                                  replacement=lambda i: [video_token_id] * keeps[i])]


class WindowProcessor(_WindowRequests, ExactOmniThinkerProcessor):
    pass


class Qwen3WindowProcessor(_WindowRequests, ExactQwen3OmniThinkerProcessor):
    def _maybe_apply_prompt_updates(self, mm_items, mm_res):
        # vLLM's Qwen3 version reads every video item's use_audio_in_video flag, which a window item has no
        # need of (its slots are one kind); Qwen2.5's reads it where present and applies the same updates.
        if "window_keep" in (mm_res.kwargs.get("video") or [{}])[0]:
            return Qwen2_5OmniThinkerMultiModalProcessor._maybe_apply_prompt_updates(self, mm_items, mm_res)
        return super()._maybe_apply_prompt_updates(mm_items, mm_res)


def encode_positions(positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(K, 3) positions -> (K, 6) channels exact in any float dtype."""
    return torch.cat([positions // POSITION_BASE, positions % POSITION_BASE], -1).to(dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """(K, 6) channels -> (3, K) positions."""
    values = channels.float().round().long()
    return (values[:, :3] * POSITION_BASE + values[:, 3:]).T


class _WindowPruning:
    """A family's exact thinker that prunes each window's joint audio+video pool with an avsieve pre-LLM
    method. The family class supplies `rotary_class` and `_video_embeddings`."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        from operators.pruning import make_pruner

        spec = json.loads(getattr(vllm_config.model_config.hf_config, PRUNER_CONFIG_KEY))
        # Weights were checked against the captioner's version by the engine that asked for this model.
        self.pruner = make_pruner(spec["method"], 1.0, weights=spec.get("weights"), allow_foreign_weights=True)
        text_config = self.config.text_config
        self.model_view = ModelView(text_config, self.rotary_class(config=text_config))

    # ---- the keep decision, after the encoders --------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        if "window_input_ids" not in kwargs:
            return super().embed_multimodal(**kwargs)
        ids = kwargs["window_input_ids"]
        if len(ids) != 1:  # the runner encodes pruned videos one at a time
            raise ValueError(f"expected one window per encoder call, got {len(ids)}")
        return [self._prune_window(kwargs)]

    def _prune_window(self, kw: dict) -> torch.Tensor:
        ids = torch.as_tensor(kw["window_input_ids"][0]).reshape(-1).long()
        grid, seconds = _window_video(kw["video_grid_thw"], kw["video_second_per_grid"])
        cfg = self.config
        video_id, audio_id = media_token_ids(cfg)
        text = self.get_language_model().embed_input_ids(ids.to(self._device()))
        hidden = text.clone()
        riders = None  # per token, what a kept token carries besides its embedding (Qwen3: DeepStack rows)
        if grid is not None:
            with set_forward_context(None, self.vllm_config):
                video = self.visual(kw["pixel_values_videos"].type(self.visual.dtype), grid_thw=grid)
            video, video_riders = self._split_video(video.to(hidden.dtype))
            hidden[ids == video_id] = video
            if video_riders is not None:
                riders = hidden.new_zeros(len(ids), video_riders.shape[-1])
                riders[ids == video_id] = video_riders
        riders = self._empty_riders(hidden, riders)
        lengths = None
        if kw.get("input_features") is not None:
            mask = torch.as_tensor(kw["feature_attention_mask"][0]).reshape(1, -1)
            lengths = mask.sum(-1)
            features = torch.as_tensor(kw["input_features"][0]).reshape(-1, mask.shape[-1])[:, :int(lengths)]
            audio = self._process_audio_input({"input_features": features.to(hidden.device),
                                               "audio_feature_lengths": lengths,
                                               "feature_attention_mask": mask})[0]
            hidden[ids == audio_id] = audio.to(hidden.dtype)
        positions, _ = tmrope_positions(cfg, ids[None], grid, lengths, seconds)
        positions = whole_positions(positions[:, 0], seconds)
        modality = modality_codes(ids, video_id, audio_id)
        retention, video_cap, audio_cap, audio_min = (float(x) for x in torch.as_tensor(kw["window_plan"]).reshape(-1))
        plan = WindowBudget(retention, int(video_cap), int(audio_cap), int(audio_min))
        seed = int(torch.as_tensor(kw["window_seed"]).reshape(-1)[0])
        self.model_view.rotary_emb.to(hidden.device)
        keep = select_window(self.pruner, hidden, positions, modality, plan, seed, self.model_view)
        media = keep.kept[modality[keep.kept] != TEXT]
        expected = int(torch.as_tensor(kw["window_keep"]).reshape(-1)[0])
        if media.numel() != expected:
            raise RuntimeError(f"{self.pruner.name} kept {media.numel()} media tokens where the request has "
                               f"{expected} slots")
        kept_modality = modality[media]
        record_kept(seed, plan, KeptWindow(media, int((kept_modality == VIDEO).sum()),
                                           int((kept_modality == AUDIO).sum()), keep.extra_layer_tokens))
        media_dev = media.to(hidden.device)
        parts = [hidden[media_dev]] + ([riders[media_dev]] if riders is not None else [])
        return torch.cat(parts + [encode_positions(positions[:, media].T, hidden.dtype).to(hidden.device)], -1)

    def _device(self) -> torch.device:
        return next(self.get_language_model().parameters()).device

    def _split_video(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The vision tower's output -> (embeddings, what each video token carries along, or None)."""
        return video, None

    def _empty_riders(self, hidden: torch.Tensor, riders: torch.Tensor | None) -> torch.Tensor | None:
        return riders

    # ---- positions -------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        windows = [f for f in mm_features if f.modality == "video" and _feature(f, "window_input_ids") is not None]
        if not windows:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        window, cfg = windows[0], self.config
        video_id, audio_id = media_token_ids(cfg)
        full_ids = _feature(window, "window_input_ids").reshape(1, -1).long()
        mask = _feature(window, "feature_attention_mask")
        grid, seconds = _window_video(_feature(window, "video_grid_thw"), _feature(window, "video_second_per_grid"))
        full, _ = tmrope_positions(cfg, full_ids, grid, mask.reshape(1, -1).sum(-1) if mask is not None else None,
                                   seconds)
        full = whole_positions(full[:, 0], seconds)
        media = ((full_ids[0] == video_id) | (full_ids[0] == audio_id)).sum()
        start, slots = window.mm_position.offset, window.mm_position.length
        # Slots get their kept tokens' positions once the encoders ran (recompute_mrope_positions).
        positions = torch.cat([full[:, :start + slots], full[:, start + int(media):]], 1)
        return positions, int(full.max()) + 1 - len(input_tokens)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.LongTensor, num_computed_tokens: int):
        ids = torch.as_tensor(input_ids).cpu()
        slots = torch.nonzero(ids == media_token_ids(self.config)[0]).flatten()
        pending = slots[slots >= num_computed_tokens]  # this chunk's embeddings cover these, in order
        positions = mrope_positions.clone()
        stripped, cursor = [], 0
        for embedding in multimodal_embeddings:
            n = embedding.shape[0]
            positions[:, pending[cursor:cursor + n]] = decode_positions(embedding[:, -POSITION_CHANNELS:]).to(
                positions.device)
            stripped.append(embedding[:, :-POSITION_CHANNELS])
            cursor += n
        return stripped, positions, int(positions.max()) + 1 - ids.numel()


@MULTIMODAL_REGISTRY.register_processor(WindowProcessor, info=WindowProcessingInfo,
                                        dummy_inputs=Qwen2_5OmniThinkerDummyInputsBuilder)
class PrunedOmniThinker(_WindowPruning, ExactOmniThinker, SupportsMultiModalPruning):
    """ExactOmniThinker that prunes each window's joint audio+video pool with an avsieve pre-LLM method."""

    @property
    def rotary_class(self):
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniRotaryEmbedding

        return Qwen2_5OmniRotaryEmbedding


@MULTIMODAL_REGISTRY.register_processor(Qwen3WindowProcessor, info=Qwen3WindowProcessingInfo,
                                        dummy_inputs=Qwen3OmniMoeThinkerDummyInputsBuilder)
class PrunedQwen3OmniThinker(_WindowPruning, ExactQwen3OmniThinker, SupportsMultiModalPruning):
    """ExactQwen3OmniThinker that prunes the same way; kept video tokens take their DeepStack rows along."""

    @property
    def rotary_class(self):
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextRotaryEmbedding

        return Qwen3OmniMoeThinkerTextRotaryEmbedding

    def _split_video(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The tower returns each video token's embedding and its DeepStack levels side by side.
        width = self.config.text_config.hidden_size
        return video[:, :width], video[:, width:]

    def _empty_riders(self, hidden: torch.Tensor, riders: torch.Tensor | None) -> torch.Tensor:
        # Sound alone has no DeepStack rows; zeros keep every window's embeddings one width.
        levels = len(self.visual.deepstack_visual_indexes)
        return riders if riders is not None else hidden.new_zeros(hidden.shape[0], levels * hidden.shape[-1])
