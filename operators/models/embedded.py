"""The embedded default model: a small Qwen2.5-Omni thinker built entirely by project code.

It uses the real classes (Qwen2TokenizerFast, Qwen2_5OmniProcessor,
Qwen2_5OmniThinkerForConditionalGeneration) so the caption job runs it through exactly the code
path of the 3B/7B checkpoints. Nothing here touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "embedded"
# Marker written into the model card and into the `model` output column while untrained.
UNTRAINED_TAG = "untrained"
# Recommended preprocessing for the embedded model (the processor's class defaults target 7B-sized
# frames; these fit the tiny vision tower). pipelines/caption.py reads them from the model card.
PREPROCESS = {"max_pixels": 168 * 168, "min_pixels": 56 * 56, "fps": 2.0}

# Special tokens, in the order they get ids right after the BPE vocabulary.
SPECIAL_TOKENS = {
    "pad_token": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
}

# A Qwen-style chat template of our own: system, user turn with the media placeholders first, then the
# generation prompt. Real checkpoints ship their own template; this one only serves the embedded model.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'video' -%}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{%- elif part['type'] == 'audio' -%}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{%- elif part['type'] == 'image' -%}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Base text the tokenizer is trained on when no caption corpus is given: prompts plus a small
# English vocabulary, so any caption still encodes (byte-level BPE covers every byte anyway).
BASE_CORPUS = [
    "Describe what is seen and heard in this clip.",
    "Describe the video and its sound in one sentence.",
    "system user assistant video audio sound picture clip scene",
    "a an the of in on at with and then while when after before is are appears moves left right up down",
    "red green blue yellow white black orange purple small large circle square triangle star",
    "tone beep noise chirp silence high low pitch rhythm burst music speech voice bird bunny water",
]


def build_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 1024, special_tokens: dict | None = None):
    """Train a byte-level BPE on `corpus` and wrap it as a Qwen2TokenizerFast with Omni's special tokens
    (`special_tokens`: the same keys as SPECIAL_TOKENS, another family's spellings; default Qwen2.5-Omni's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    specials = special_tokens or SPECIAL_TOKENS
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(specials.values()),
        show_progress=False,
    )
    bpe.train_from_iterator(list(BASE_CORPUS) + list(corpus), trainer=trainer)
    named = {k: v for k, v in specials.items() if k in ("pad_token", "eos_token")}
    multimodal = {k: v for k, v in specials.items() if k not in ("pad_token", "eos_token", "im_start")}
    tok = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        **named,
        extra_special_tokens=multimodal,
        padding_side="left",
    )
    return tok


def build_processor(tokenizer, max_pixels: int = 168 * 168, min_pixels: int = 56 * 56):
    """Qwen2_5OmniProcessor for the embedded model (smaller frames than the 7B defaults)."""
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size, cap_pixels_per_frame=False),
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def marker_token_ids(tokenizer, ids: dict) -> dict:
    """Config ids of the span markers, user, pad and eos tokens (both Omni families name them alike);
    `ids`: special token name -> id, as SPECIAL_TOKENS names them."""
    return dict(audio_start_token_id=ids["audio_bos_token"], audio_end_token_id=ids["audio_eos_token"],
                vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"],
                user_token_id=tokenizer.convert_tokens_to_ids("user") if "user" in tokenizer.get_vocab() else 0,
                pad_token_id=ids["pad_token"], eos_token_id=ids["eos_token"])


def tiny_thinker_config(tokenizer, hidden: int = 256, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                        vision_hidden: int = 128, vision_depth: int = 2):
    """A Qwen2.5-Omni thinker config of the real architecture, scaled down for CPU."""
    from transformers import Qwen2_5OmniThinkerConfig

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in SPECIAL_TOKENS.items()}
    head_dim = hidden // heads
    # mrope sections must sum to head_dim/2; keep Qwen's 1:1.5:1.5 split of (T, H, W).
    t = head_dim // 2 // 4
    hw = (head_dim // 2 - t) // 2
    mrope = [t, hw, head_dim // 2 - t - hw]
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(
            num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=512,
            d_model=128, output_dim=hidden, n_window=50, max_source_positions=1500,
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=4,
            out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=[vision_depth - 1],
        ),
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": mrope},
            pad_token_id=ids["pad_token"], eos_token_id=ids["eos_token"], use_sliding_window=False,
            tie_word_embeddings=False,
        ),
        audio_token_index=ids["audio_token"],
        image_token_index=ids["image_token"],
        video_token_index=ids["video_token"],
        **marker_token_ids(tokenizer, ids),
    )


def build_untrained(out_dir: Path | str = EMBEDDED_MODEL_DIR, seed: int = 0, corpus: Iterable[str] = ()) -> Path:
    """Write a randomly initialised tiny thinker + processor as a from_pretrained directory."""
    import torch
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(corpus)
    processor = build_processor(tokenizer)
    config = tiny_thinker_config(tokenizer)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    write_model_card(out_dir, UNTRAINED_TAG, {"seed": seed})
    return out_dir


def write_model_card(out_dir: Path | str, status: str, extra: dict | None = None) -> None:
    """avsieve_model.json: what the model is, how it was made, and its recommended preprocessing."""
    card = {"name": "avsieve-omni-tiny", "status": status, "preprocess": PREPROCESS, **(extra or {})}
    (Path(out_dir) / "avsieve_model.json").write_text(json.dumps(card, indent=1) + "\n")


if __name__ == "__main__":
    print(build_untrained())
