"""Qwen2.5-Omni thinker adapter: loading, batching, merged embeddings and the pruning-aware decoder.

Only the thinker (text output) is loaded, from either a thinker checkpoint (the embedded model) or a
full Qwen2.5-Omni checkpoint such as Qwen/Qwen2.5-Omni-7B (talker and token2wav weights are skipped).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from operators.models.decoder import AUDIO, PAD, TEXT, VIDEO, PrunableDecoder, TokenState
from operators.models.embedded import EMBEDDED_MODEL_DIR
from operators.models.positions import tmrope_positions
from operators.models.repeats import RepeatedSentenceBan
from operators.pruning.content import sample_signals
from operators.pruning.flops import prefill_flops
from operators.pruning.window import window_seed


class ModelNotFoundError(RuntimeError):
    pass


def resolve_model_source(model: str | None) -> str:
    """None or "embedded" -> the bundled model directory; anything else is a path or hub id."""
    if model in (None, "", "embedded"):
        return str(EMBEDDED_MODEL_DIR)
    return model


def model_card(source: str) -> dict:
    """Project metadata shipped next to an embedded/trained model (empty for third-party checkpoints)."""
    card = Path(source) / "avsieve_model.json"
    return json.loads(card.read_text()) if card.is_file() else {}


def model_label(source: str) -> str:
    """What goes into the `model` output column."""
    card = model_card(source)
    if not card:
        return source
    label = card.get("name", Path(source).name)
    return f"{label} ({card['status']})" if card.get("status") else label


def _load_error(source: str, err: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"cannot load model {source!r}: it is neither a local Qwen2.5-Omni / Qwen3-Omni directory nor a Hugging Face id "
        f"available in the local cache (and it could not be downloaded: {type(err).__name__}: {err}). "
        "Pass --model with a local from_pretrained directory, or pre-download the checkpoint."
    )


@functools.lru_cache(maxsize=4)
def load_processor(source: str):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - re-raised with a readable message
        raise _load_error(source, err) from err


def load_model_config(source: str):
    """The checkpoint's config, or a ModelNotFoundError that says what --model should be."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - re-raised with a readable message
        raise _load_error(source, err) from err


def load_thinker(source: str, dtype: torch.dtype, device: str, attn_implementation: str):
    """The thinker of a Qwen2.5-Omni or Qwen3-Omni checkpoint (the config's model_type picks the family)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from operators.models import qwen3_omni

    config = load_model_config(source)
    if qwen3_omni.is_qwen3_omni(config):
        return qwen3_omni.load_thinker(source, config, dtype, attn_implementation).to(device).eval()
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if config.model_type == "qwen2_5_omni":
        # Full Omni checkpoint: build only the thinker and strip the "thinker." weight prefix.
        kwargs.update(config=config.thinker_config, key_mapping={r"^thinker\.": ""})
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(source, **kwargs)
    return model.to(device).eval()


def eos_token_ids(tokenizer) -> list[int]:
    """The tokens that end a caption (the chat turn's end, the text's end), for every engine."""
    eos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    return sorted({t for t in eos if t is not None and t >= 0})


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


@dataclass
class EmbeddedBatch:
    state: TokenState
    input_ids: torch.Tensor  # (B, L) left padded
    extras: dict


class OmniThinker:
    """One loaded thinker; turns tokenized windows into captions through PrunableDecoder."""

    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "auto",
                 attn_implementation: str = "sdpa"):
        source = resolve_model_source(model)
        device = pick_device(device)
        torch_dtype = pick_dtype(dtype, device)
        self._setup(load_thinker(source, torch_dtype, device, attn_implementation), load_processor(source),
                    device, torch_dtype, model_label(source), source)

    @classmethod
    def from_loaded(cls, model, processor, device: str, label: str = "in-memory") -> "OmniThinker":
        """Wrap an already built thinker (benchmarks build 7B-width models with random weights)."""
        self = cls.__new__(cls)
        self._setup(model, processor, device, model.dtype, label)
        return self

    def _setup(self, model, processor, device: str, dtype: torch.dtype, label: str, source: str | None = None) -> None:
        from operators.models.rope import SyncRotaryEmbedding, configured_section, install_sync_rope

        self.model, self.processor, self.device, self.dtype, self.label = model, processor, device, dtype, label
        self.source = source  # where trained pruners look for their default weights
        section = configured_section(model)
        if section and not isinstance(model.model.language_model.rotary_emb, SyncRotaryEmbedding):
            install_sync_rope(model, section)  # the model was trained with Sync-RoPE (its config says so)
        cfg = self.model.config
        self.video_token_id, self.audio_token_id = cfg.video_token_id, cfg.audio_token_id
        self.pad_token_id = self.processor.tokenizer.pad_token_id
        self.eos_token_ids = eos_token_ids(self.processor.tokenizer)
        lm = self.model.model.language_model
        self.decoder = PrunableDecoder(lm.layers, lm.rotary_emb, lm.norm, self.model.lm_head,
                                       lm.embed_tokens, self.model.config._attn_implementation)

    @functools.cached_property
    def repeat_ban(self) -> RepeatedSentenceBan:
        return RepeatedSentenceBan.for_tokenizer(self.processor.tokenizer)  # reads the vocabulary once

    # ---- batching ----------------------------------------------------------------------------
    def collate(self, samples: list[dict[str, torch.Tensor]]) -> dict:
        """Left-pad token ids and concatenate the per-sample media tensors in batch order."""
        length = max(int(s["input_ids"].shape[-1]) for s in samples)
        ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        for b, s in enumerate(samples):
            n = s["input_ids"].shape[-1]
            ids[b, length - n:] = s["input_ids"].reshape(-1)
            mask[b, length - n:] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "samples": samples}
        with_video = [s for s in samples if "pixel_values_videos" in s]
        if with_video:
            batch["pixel_values_videos"] = torch.cat([s["pixel_values_videos"] for s in with_video])
            batch["video_grid_thw"] = torch.cat([s["video_grid_thw"] for s in with_video])
        with_audio = [s for s in samples if "input_features" in s]
        if with_audio:
            frames = max(int(s["input_features"].shape[-1]) for s in with_audio)
            pad = lambda t: torch.nn.functional.pad(t, (0, frames - t.shape[-1]))  # noqa: E731
            batch["input_features"] = torch.cat([pad(s["input_features"]) for s in with_audio])
            batch["feature_attention_mask"] = torch.cat([pad(s["feature_attention_mask"]) for s in with_audio])
        return batch

    def embed(self, batch: dict, grad: bool = False) -> EmbeddedBatch:
        """Merged text/video/audio embeddings plus original TMRoPE position ids, as the thinker builds them
        (grad=True keeps the encoders in the autograd graph, for training)."""
        with torch.set_grad_enabled(grad):
            return self._embed(batch)

    def _embed(self, batch: dict) -> EmbeddedBatch:
        thinker = self.model.model
        dev = self.device
        input_ids = batch["input_ids"].to(dev)
        attention_mask = batch["attention_mask"].to(dev)
        embeds = thinker.get_input_embeddings()(input_ids)
        if "input_features" in batch:
            audio = thinker.get_audio_features(batch["input_features"].to(dev, self.dtype),
                                               batch["feature_attention_mask"].to(dev), return_dict=True)
            audio_mask = (input_ids == self.audio_token_id)[..., None]
            embeds = embeds.masked_scatter(audio_mask, audio.last_hidden_state.to(embeds.dtype))
        deepstack = None
        if "pixel_values_videos" in batch:
            video = thinker.get_video_features(batch["pixel_values_videos"].to(dev, self.dtype),
                                               batch["video_grid_thw"].to(dev), return_dict=True)
            video_mask = (input_ids == self.video_token_id)[..., None]
            embeds = embeds.masked_scatter(video_mask, torch.cat(video.pooler_output).to(embeds.dtype))
            deepstack = _deepstack(getattr(video, "deepstack_features", None), video_mask[..., 0], embeds)
        positions = self._position_ids(batch, input_ids, attention_mask)
        valid = attention_mask.bool()
        modality = torch.full_like(input_ids, TEXT, dtype=torch.int8)
        modality[input_ids == self.video_token_id] = VIDEO
        modality[input_ids == self.audio_token_id] = AUDIO
        modality[~valid] = PAD
        source = (valid.long().cumsum(1) - 1).masked_fill(~valid, -1)  # index within the sample's own prompt
        state = TokenState(embeds, positions, valid, modality, source, deepstack)
        extras = self._extras(batch["samples"])
        extras["position_ids_per_second"] = int(getattr(self.model.config, "position_id_per_seconds", 25))
        return EmbeddedBatch(state, input_ids, extras)

    @staticmethod
    def _extras(samples: list[dict]) -> dict:
        """Model-independent inputs for pruners: content signals and a per-window seed."""
        return {"signals": [sample_signals(s) for s in samples], "seeds": [window_seed(s) for s in samples]}

    def _position_ids(self, batch: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """TMRoPE ids per sample (samples may differ in whether audio is interleaved with video)."""
        positions = None
        for b, sample in enumerate(batch["samples"]):
            grid = sample.get("video_grid_thw")
            feat = sample.get("feature_attention_mask")
            pos, _ = tmrope_positions(
                self.model.config, input_ids[b:b + 1],
                video_grid_thw=grid.to(input_ids.device) if grid is not None else None,
                audio_seqlens=feat.sum(-1).to(input_ids.device) if feat is not None else None,
                second_per_grids=sample.get("video_second_per_grid"),
                attention_mask=attention_mask[b:b + 1],
            )
            if positions is None:  # Qwen3-Omni's ids are float (a video grid's time may be fractional)
                positions = torch.ones(3, *input_ids.shape, dtype=pos.dtype, device=input_ids.device)
            positions[:, b] = pos[:, 0]
        return positions

    # ---- captioning --------------------------------------------------------------------------
    def caption(self, samples: list[dict[str, torch.Tensor]], max_new_tokens: int, hook=None,
                temperature: float = 0.0, seed: int = 0, num_beams: int = 1,
                no_repeat_sentences: bool = False) -> list[dict]:
        t0 = time.perf_counter()
        emb = self.embed(self.collate(samples))
        prompt_len = emb.state.valid.sum(1)
        encode_s = time.perf_counter() - t0
        prefill = self.decoder.prefill(emb.state, hook=hook, extras=emb.extras)
        t1 = time.perf_counter()
        generators = None
        if temperature > 0:  # one stream per window: (run seed, window content) -> same caption in any batch
            generators = [torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + window_seed)
                          for window_seed in emb.extras["seeds"]]
        repeat_ban = self.repeat_ban if no_repeat_sentences else None
        tokens = self.decoder.decode(prefill, max_new_tokens, self.eos_token_ids, temperature, generators,
                                     num_beams=num_beams, repeat_ban=repeat_ban)
        generate_s = time.perf_counter() - t1
        texts = self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        kept = torch.stack(prefill.kept_per_layer).float()  # (layers, B, [text, video, audio])
        layer_mean = kept.mean(0)  # kept counts averaged over layers = compute-equivalent kept tokens
        text_cfg = self.model.config.get_text_config()
        results = []
        for b, text in enumerate(texts):
            video = int((emb.input_ids[b] == self.video_token_id).sum())
            audio = int((emb.input_ids[b] == self.audio_token_id).sum())
            results.append({
                "caption": text.strip(),
                "text_tokens": int(prompt_len[b]) - video - audio,
                "video_tokens": video,
                "audio_tokens": audio,
                "video_tokens_kept": int(round(float(layer_mean[b, 1]))),
                "audio_tokens_kept": int(round(float(layer_mean[b, 2]))),
                # Layers a pruner ran on its own (EchoingPixels' sieve) count as prefill compute too.
                "prefill_flops": prefill_flops([int(n) for n in kept[:, b].sum(-1)]
                                               + emb.extras.get("extra_layer_tokens", [[]] * len(texts))[b],
                                               text_cfg),
                "kept_per_layer": [[int(x) for x in layer[b]] for layer in prefill.kept_per_layer],
                "kept_media": _kept_media(prefill.final_state, b),
                "output_tokens": len(tokens[b]),
                # decode drops the end token, so a full-length row is one the model never ended
                "caption_truncated": len(tokens[b]) >= max_new_tokens,
                # Batch-level times, split evenly so that per-row sums add up to the batch's time.
                "prefill_ms": 1000 * (encode_s + prefill.seconds) / len(texts),
                "generate_ms": 1000 * generate_s / len(texts),
            })
        return results


def _deepstack(features, video_mask: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor | None:
    """Qwen3-Omni's DeepStack inputs as (levels, B, L, D), zero off the video tokens: the decoder adds level
    i after layer i, and pruning gathers them with the tokens they belong to (None for Qwen2.5-Omni)."""
    if not features:
        return None
    out = embeds.new_zeros(len(features), *embeds.shape)
    for level, feat in enumerate(features):
        out[level][video_mask] = torch.cat(list(feat)).to(embeds.dtype)
    return out


def _kept_media(state: TokenState, b: int) -> list[int]:
    """Indices (in the window's own prompt) of the audio and video tokens the last layer saw."""
    media = state.valid[b] & ((state.modality[b] == VIDEO) | (state.modality[b] == AUDIO))
    return sorted(int(i) for i in state.source_index[b][media])
