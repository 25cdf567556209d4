"""Tokenize one decoded window with the model's own Hugging Face processor.

Audio is interleaved with video the way Qwen2.5-Omni expects (`load_audio_from_video`: 2-s chunks of
video tokens followed by the audio tokens of the same 2 s); an input without video is prompted with the
chat template's audio part alone. The resulting tensors travel to the caption
actors as one safetensors blob per row, so Ray never has to understand ragged tensor columns.
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

SAMPLE_RATE = 16_000


def build_prompt(processor, prompt: str, has_video: bool = True) -> str:
    """The chat-templated prompt of one window: a video part (its audio, if any, rides inside it), or for
    sound alone an audio part, as the model's chat template spells each."""
    content = [{"type": "video" if has_video else "audio"}, {"type": "text", "text": prompt}]
    conversation = [{"role": "user", "content": content}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def video_size(processor, max_pixels: int | None, min_pixels: int | None) -> dict | None:
    """The video processor's `size` for these pixel bounds (None: the processor's own). Both engines pass
    it, so vLLM resizes frames exactly as the HF engine's processor call does."""
    if not max_pixels:
        return None
    size = dict(processor.video_processor.size)
    size["longest_edge"] = int(max_pixels)
    size["shortest_edge"] = int(min(min_pixels or size.get("shortest_edge", max_pixels), max_pixels))
    return size


def model_inputs(processor, frames: np.ndarray | None, fps: float, audio: np.ndarray | None, prompt: str,
                 max_pixels: int | None = None, min_pixels: int | None = None) -> dict[str, torch.Tensor]:
    """Processor call for one window: frames (T,H,W,3) uint8 at `fps` (None: sound alone), audio mono
    16 kHz or None."""
    if frames is None:
        if audio is None:
            raise ValueError("a window needs frames or audio")
        out = processor(text=[build_prompt(processor, prompt, has_video=False)], audio=[audio.astype(np.float32)],
                        return_tensors="pt")
        return _kept_tensors(out)
    videos_kwargs: dict = {"fps": float(fps)}
    size = video_size(processor, max_pixels, min_pixels)
    if size:
        videos_kwargs["size"] = size
    kwargs: dict = {}
    if audio is not None:
        kwargs = dict(audio=[audio.astype(np.float32)], audio_from_video_indices=[0], load_audio_from_video=True)
    out = processor(text=[build_prompt(processor, prompt)], videos=[frames], videos_kwargs=videos_kwargs,
                    return_tensors="pt", **kwargs)
    return _kept_tensors(out)


def _kept_tensors(out) -> dict[str, torch.Tensor]:
    """The processor outputs the engines use, trimmed (no Whisper padding past the audio's end)."""
    keep = ("input_ids", "pixel_values_videos", "video_grid_thw", "video_second_per_grid",
            "input_features", "feature_attention_mask")
    tensors = {k: torch.as_tensor(out[k]).contiguous() for k in keep if k in out}
    if "video_second_per_grid" in tensors:
        tensors["video_second_per_grid"] = tensors["video_second_per_grid"].float()
    if "feature_attention_mask" in tensors:
        # Whisper features come padded to 30 s; keep only the valid frames (collate pads again per batch).
        n = int(tensors["feature_attention_mask"].sum())
        tensors["input_features"] = tensors["input_features"][..., :n].contiguous()
        tensors["feature_attention_mask"] = tensors["feature_attention_mask"][..., :n].contiguous()
    return tensors


def token_counts(tensors: dict[str, torch.Tensor], video_token_id: int, audio_token_id: int) -> tuple[int, int]:
    ids = tensors["input_ids"]
    return int((ids == video_token_id).sum()), int((ids == audio_token_id).sum())


def pack(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save(tensors)


def unpack(blob: bytes) -> dict[str, torch.Tensor]:
    return st_load(bytes(blob))


# ---- the vLLM engine's compact window --------------------------------------------------------------
def pack_compact(input_ids: torch.Tensor, frames: np.ndarray | None, fps: float, audio: np.ndarray | None,
                 prompt_text: str, size: dict | None) -> bytes:
    """What the vLLM engine needs for one window: uint8 frames (a quarter of the bytes of the float32
    patches the HF engine gets; none for sound alone), audio samples, the templated prompt, the processor
    settings, and the HF processor's token ids (the engine checks that vLLM's processor made the same)."""
    tensors = {
        "input_ids": input_ids.reshape(-1).to(torch.int32).contiguous(),
        "fps": torch.tensor([float(fps)], dtype=torch.float64),
        "prompt_text": torch.frombuffer(bytearray(prompt_text.encode()), dtype=torch.uint8),
    }
    if frames is not None:
        tensors["frames"] = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.uint8))
    if size:
        tensors["size"] = torch.tensor([size["shortest_edge"], size["longest_edge"]], dtype=torch.int64)
    if audio is not None:
        tensors["audio"] = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    return st_save(tensors)


def unpack_compact(blob: bytes) -> dict:
    t = st_load(bytes(blob))
    size = None
    if "size" in t:
        shortest, longest = (int(x) for x in t["size"])
        size = {"shortest_edge": shortest, "longest_edge": longest}
    return {"input_ids": t["input_ids"].long(), "frames": t["frames"].numpy() if "frames" in t else None,
            "fps": float(t["fps"][0]),
            "prompt_text": bytes(t["prompt_text"].numpy()).decode(), "size": size,
            "audio": t["audio"].numpy() if "audio" in t else None}
