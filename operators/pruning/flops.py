"""Analytic LLM prefill FLOPs (multiply-add = 2 FLOPs) from the per-layer token counts."""

from __future__ import annotations


def layer_flops(tokens: int, cfg) -> float:
    """One decoder layer over `tokens` prompt tokens with a causal mask."""
    d, heads, kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    projections = 2 * tokens * d * (heads * head_dim * 2 + kv_heads * head_dim * 2)  # q, o + k, v
    mlp = 2 * tokens * d * cfg.intermediate_size * 3  # gate, up, down
    attention = 2 * 2 * heads * head_dim * tokens * (tokens + 1) / 2  # QK^T and AV, causal half
    return float(projections + mlp + attention)


def prefill_flops(tokens_per_layer: list[int], cfg) -> float:
    """LLM prefill FLOPs for one window (encoders excluded: they are the same for every method);
    the LM head runs on the last position only."""
    return sum(layer_flops(n, cfg) for n in tokens_per_layer) + 2 * cfg.hidden_size * cfg.vocab_size
