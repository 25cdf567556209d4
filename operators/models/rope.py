"""Sync-RoPE (EchoingPixels): multimodal RoPE whose lowest-frequency band also carries time.

Qwen2.5-Omni's TMRoPE splits each head's frequency pairs into (T, H, W) sections, highest frequencies
first, so time only ever rotates fast. After aggressive pruning, neighbouring kept tokens can be many
time steps apart and those fast channels wrap around; Sync-RoPE appends a fourth section of the lowest
frequencies that also follows T, so temporal order stays readable. Layout: [T, H, W, T], scaled from
the paper's 18/18/18/10 split of 64 pairs.

It changes what the LLM computes, so a model must be trained or fine-tuned with it; a model that was
records the section in its text config (`sync_rope_section`) and the adapter installs it on load.
Kept tokens keep their original position ids either way.
"""

from __future__ import annotations

import torch
from torch import nn

CONFIG_KEY = "sync_rope_section"
PAPER_SECTION = (18, 18, 18, 10)  # of 64 frequency pairs (head_dim 128)
AXES = (0, 1, 2, 0)  # T, H, W, then T again on the lowest frequencies


def sync_section(pairs: int) -> list[int]:
    """The paper's split scaled to `pairs` frequency pairs (head_dim / 2)."""
    low = max(1, round(pairs * PAPER_SECTION[3] / sum(PAPER_SECTION)))
    rest = pairs - low
    third = rest // 3
    return [rest - 2 * third, third, third, low]


class SyncRotaryEmbedding(nn.Module):
    """Drop-in for the thinker's rotary embedding: (x, position_ids (3, B, L)) -> (cos, sin) (B, L, head_dim)."""

    def __init__(self, base: nn.Module, section: list[int]):
        super().__init__()
        inv_freq = base.inv_freq.detach().clone()
        if sum(section) != inv_freq.numel() or len(section) != 4:
            raise ValueError(f"Sync-RoPE section {section} must have 4 parts summing to {inv_freq.numel()}")
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.section = list(section)
        self.attention_scaling = getattr(base, "attention_scaling", 1.0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        position_ids = position_ids.expand(3, -1, -1)
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (3, B, L, pairs)
        parts = [chunk[axis] for chunk, axis in zip(freqs.split(self.section, dim=-1), AXES)]
        emb = torch.cat(parts, dim=-1)
        emb = torch.cat((emb, emb), dim=-1)
        return ((emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype))


def install_sync_rope(thinker_model, section: list[int] | None = None) -> list[int]:
    """Switch a Qwen2_5OmniThinkerForConditionalGeneration to Sync-RoPE (in place) and record it in its config."""
    lm = thinker_model.model.language_model
    text_config = thinker_model.config.get_text_config()
    section = list(section or sync_section(lm.rotary_emb.inv_freq.numel()))
    lm.rotary_emb = SyncRotaryEmbedding(lm.rotary_emb, section)
    setattr(text_config, CONFIG_KEY, section)
    return section


def configured_section(thinker_model) -> list[int] | None:
    return getattr(thinker_model.config.get_text_config(), CONFIG_KEY, None)
