"""Qwen3-Omni (transformers' Qwen3OmniMoe* classes): what differs from Qwen2.5-Omni, for the one adapter.

The thinker is a mixture-of-experts decoder (Qwen/Qwen3-Omni-30B-A3B-*: 48 layers, 128 experts, 8 active per
token) with q/k RMS norms in attention, interleaved TM-RoPE (T/H/W frequencies alternate instead of
forming blocks; its rotary embedding handles that) and DeepStack: features of three vision-encoder layers
are added to the video tokens' hidden states after decoder layers 0, 1, 2. Audio-in-video positions
follow audio time (one position per audio token, 12.5 tokens/s; video at position_id_per_seconds).
OmniThinker (qwen2_5_omni.py) serves both families; this module holds what only Qwen3-Omni needs:
loading, and a tiny random checkpoint of the real architecture for tests and benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_TYPES = ("qwen3_omni_moe", "qwen3_omni_moe_thinker")

# The real checkpoints' special-token spellings (the Qwen2.5 embedded model's keys, Qwen3-Omni's strings).
SPECIAL_TOKENS = {
    "pad_token": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "audio_token": "<|audio_pad|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}

# A Qwen-style template of our own for the tiny checkpoint (real checkpoints ship theirs).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif part['type'] == 'audio' -%}<|audio_start|><|audio_pad|><|audio_end|>"
    "{%- elif part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Preprocessing for the tiny checkpoint: Qwen3-Omni's 16-px patches, 2x2 merge -> 32-px token cells.
TINY_PREPROCESS = {"max_pixels": 160 * 160, "min_pixels": 64 * 64, "fps": 2.0}
POSITION_ID_PER_SECONDS = 13  # the real checkpoints' value (and the processor's default)


def is_qwen3_omni(config) -> bool:
    return getattr(config, "model_type", None) in MODEL_TYPES


def is_qwen3_omni_processor(processor) -> bool:
    return type(processor).__name__.startswith("Qwen3OmniMoe")


def whole_feature_frames(audio, processor):
    """The samples of `audio` that fill whole feature frames (hop_length samples: 10 ms at 16 kHz). vLLM's
    Qwen3-Omni processor pads a partial last frame with zeros and counts the frames its own way, so the two
    engines would otherwise encode a different last frame, or one audio token more; cut, they agree."""
    hop = processor.feature_extractor.hop_length
    return audio[:len(audio) - len(audio) % hop]


def whole_time_ids(config, processor, fps: float) -> bool:
    """Whether a video sampled at `fps` gets whole-number time position ids: one temporal grid step
    (temporal_patch_size frames) spans temporal_patch_size / fps seconds, position_id_per_seconds ids a
    second. transformers keeps fractional ids as floats (e.g. 3 fps: 8.67 a step); vLLM cannot."""
    thinker = getattr(config, "thinker_config", config)
    step = processor.video_processor.temporal_patch_size / fps * thinker.position_id_per_seconds
    return abs(step - round(step)) < 1e-3  # as vllm_model.transformers_positions tolerates


def vllm_config(config: dict) -> dict:
    """A Qwen3-Omni config dict as vLLM 0.32 builds the model from: the full `qwen3_omni_moe` config (a
    thinker's wrapped), text output only, with what vLLM reads under other names than transformers 5."""
    import copy
    import math

    if config.get("model_type") == "qwen3_omni_moe":
        full = copy.deepcopy(config)
    elif config.get("model_type") == "qwen3_omni_moe_thinker":
        full = {"model_type": "qwen3_omni_moe", "thinker_config": copy.deepcopy(config)}
    else:
        raise ValueError(f"not a Qwen3-Omni checkpoint (model_type {config.get('model_type')!r})")
    thinker = full["thinker_config"]
    vision = thinker["vision_config"]
    # vLLM's vision tower sizes its position table from image_size and asks whether to add it; transformers
    # 5 keeps the table's size (num_position_embeddings) and always adds it.
    vision.setdefault("image_size", vision["patch_size"] * math.isqrt(vision["num_position_embeddings"]))
    vision.setdefault("apply_vit_abs_pos_embed", True)
    # transformers' Qwen3-Omni rotary always interleaves the T/H/W frequencies; vLLM only when this key says
    # so (without it every position with H != W != T, i.e. each video token, gets other angles).
    for key in ("rope_parameters", "rope_scaling"):
        if thinker.get("text_config", {}).get(key):
            thinker["text_config"][key]["mrope_interleaved"] = True
    full["enable_audio_output"] = False
    return full


def load_thinker(source: str, config, dtype, attn_implementation: str):
    """The thinker of a thinker-only or full (thinker + talker + code2wav) Qwen3-Omni checkpoint."""
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if config.model_type == "qwen3_omni_moe":
        # Full checkpoint: build only the thinker and strip the "thinker." prefix (talker weights skipped).
        kwargs.update(config=config.thinker_config, key_mapping={r"^thinker\.": ""})
    return Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(source, **kwargs)


# ---- a tiny checkpoint of the real architecture ------------------------------------------------------
def build_processor(tokenizer, max_pixels: int = TINY_PREPROCESS["max_pixels"],
                    min_pixels: int = TINY_PREPROCESS["min_pixels"]):
    from transformers import (Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3OmniMoeProcessor,
                              WhisperFeatureExtractor)

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    common = dict(size=size, patch_size=16, merge_size=2, temporal_patch_size=2)
    return Qwen3OmniMoeProcessor(
        image_processor=Qwen2VLImageProcessor(**common),
        video_processor=Qwen2VLVideoProcessor(**common, cap_pixels_per_frame=False),
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_thinker_config(tokenizer, hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                        experts: int = 8, active: int = 2, vision_depth: int = 3):
    """A Qwen3-Omni thinker config of the real architecture (MoE decoder, DeepStack, AuT audio encoder),
    scaled down for CPU. Layer 0 is dense (mlp_only_layers) so both decoder-layer kinds are exercised."""
    from transformers import Qwen3OmniMoeThinkerConfig

    from operators.models.embedded import marker_token_ids

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in SPECIAL_TOKENS.items()}
    head_dim = 32
    pairs = head_dim // 2
    t = pairs // 4 + pairs % 4  # the real split is [24, 20, 20] of 64 pairs
    hw = (pairs - t) // 2
    return Qwen3OmniMoeThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256,
                          d_model=64, output_dim=hidden, n_window=50, n_window_infer=800, conv_chunksize=500,
                          downsample_hidden_size=32, max_source_positions=1500),
        vision_config=dict(depth=vision_depth, hidden_size=64, intermediate_size=128, num_heads=4,
                           out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=256, deepstack_visual_indexes=list(range(vision_depth))),
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, head_dim=head_dim,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            moe_intermediate_size=hidden, num_experts=experts, num_experts_per_tok=active, mlp_only_layers=[0],
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [t, hw, pairs - t - hw],
                             "interleaved": True},
            pad_token_id=ids["pad_token"], eos_token_id=ids["eos_token"], tie_word_embeddings=False,
        ),
        position_id_per_seconds=POSITION_ID_PER_SECONDS,
        audio_token_id=ids["audio_token"],
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        **marker_token_ids(tokenizer, ids),
    )


def build_tiny(out_dir: Path | str, seed: int = 0, **config_kwargs) -> Path:
    """Write a random tiny Qwen3-Omni thinker (weights, config, processor, tokenizer, template) to out_dir."""
    import torch
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from operators.models.embedded import build_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(special_tokens=SPECIAL_TOKENS)
    processor = build_processor(tokenizer)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(tiny_thinker_config(tokenizer, **config_kwargs)).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    card = {"name": "avsieve-qwen3-omni-tiny", "status": "random", "family": "qwen3-omni", "seed": seed,
            "preprocess": TINY_PREPROCESS}
    (out_dir / "avsieve_model.json").write_text(json.dumps(card, indent=1) + "\n")
    return out_dir
