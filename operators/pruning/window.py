"""One window's pre-LLM keep decision, outside any engine.

Both engines prune with the same code: the HF engine's decoder calls `Pruner.select` on its batch before
the first layer (operators/models/decoder.py); the vLLM engine's model class calls `select_window`
below, which builds the same one-window context and calls the same `Pruner.select`. What a method needs
is all here: the merged embeddings, each token's modality, its original TMRoPE position (time order
comes from it), the window's plan (WindowBudget) and the window's seed.

Only methods that act on the merged embeddings (`Pruner.pre_llm`) can run this way; FastV and FastAV drop
tokens between decoder layers and stay in the HF engine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from operators.models.decoder import AUDIO, TEXT, VIDEO, PruneContext, TokenState


@dataclass
class ModelView:
    """What a pruner may read of the model it prunes for (the HF engine passes its PrunableDecoder)."""

    text_config: object
    rotary_emb: torch.nn.Module  # transformers' rotary embedding of the thinker (the sieve's layers use it)


def window_seed(sample: dict[str, torch.Tensor]) -> int:
    """The window's seed for random choices: a function of its content, so a window draws the same in any
    batch and in either engine."""
    digest = hashlib.sha1(sample["input_ids"].long().numpy().tobytes())
    if "pixel_values_videos" in sample:
        digest.update(sample["pixel_values_videos"][:64].float().numpy().tobytes())
    return int.from_bytes(digest.digest()[:4], "little")


def kept_count(plan, n_video: int, n_audio: int) -> int:
    """How many audio+video tokens a pre-LLM method keeps of this window under `plan`: known before any
    model runs, which is what lets vLLM size the request (every method keeps the plan's joint keep)."""
    if not plan.prunes(n_video, n_audio):
        return n_video + n_audio
    return plan.joint_keep(n_video, n_audio)


def modality_codes(input_ids: torch.Tensor, video_token_id: int, audio_token_id: int) -> torch.Tensor:
    modality = torch.full_like(input_ids, TEXT, dtype=torch.int8)
    modality[input_ids == video_token_id] = VIDEO
    modality[input_ids == audio_token_id] = AUDIO
    return modality


@dataclass
class WindowKeep:
    kept: torch.Tensor  # sorted indices into the window's unpruned prompt (text and kept media)
    extra_layer_tokens: list[int]  # full-length layers the scorer ran (EchoingPixels' sieve), for the FLOPs


def select_window(pruner, hidden: torch.Tensor, positions: torch.Tensor, modality: torch.Tensor, plan, seed: int,
                  model: ModelView) -> WindowKeep:
    """The tokens `pruner` keeps of one window: hidden (L, D) merged embeddings, positions (3, L) original
    TMRoPE ids, modality (L,) codes, `plan` the window's WindowBudget."""
    length = hidden.shape[0]
    state = TokenState(hidden[None], positions[:, None].to(hidden.device), torch.ones(1, length, dtype=torch.bool,
                       device=hidden.device), modality[None].to(hidden.device),
                       torch.arange(length, device=hidden.device)[None])
    extras = {"plans": [plan], "seeds": [int(seed)]}
    ctx = PruneContext(0, int(model.text_config.num_hidden_layers), state, model, None, _no_scores, extras)
    keep = pruner.select(ctx)
    kept = torch.arange(length) if keep is None else torch.sort(keep[0].cpu()).values
    return WindowKeep(kept, list(extras.get("extra_layer_tokens", [[]])[0]))


def _no_scores():
    raise ValueError("attention scores exist only inside the HF engine's decoder (FastV / FastAV)")
