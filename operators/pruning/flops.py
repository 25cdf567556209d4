"""Analytic LLM prefill FLOPs (multiply-add = 2 FLOPs) from the per-layer token counts.

Mixture-of-experts layers (Qwen3-Omni's thinker) count the experts a token is routed to
(num_experts_per_tok, e.g. 8 of 128), plus the router; the idle experts cost nothing, so
this is the compute a token really takes, not the layer's parameter count.
"""

from __future__ import annotations


def is_moe_layer(cfg, layer: int) -> bool:
    """Whether decoder layer `layer` is a sparse MoE block (transformers' Qwen3-Omni rule)."""
    experts = getattr(cfg, "num_experts", 0) or 0
    if experts <= 0 or layer in (getattr(cfg, "mlp_only_layers", None) or []):
        return False
    return (layer + 1) % (getattr(cfg, "decoder_sparse_step", 1) or 1) == 0


def mlp_flops(tokens: int, cfg, layer: int = 0) -> float:
    d = cfg.hidden_size
    if is_moe_layer(cfg, layer):
        router = 2 * tokens * d * cfg.num_experts
        return float(router + 2 * tokens * d * cfg.moe_intermediate_size * 3 * cfg.num_experts_per_tok)
    return float(2 * tokens * d * cfg.intermediate_size * 3)  # gate, up, down


def layer_flops(tokens: int, cfg, layer: int = 0) -> float:
    """One decoder layer over `tokens` prompt tokens with a causal mask (`layer`: its index, for MoE models
    whose layers differ)."""
    d, heads, kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    projections = 2 * tokens * d * (heads * head_dim * 2 + kv_heads * head_dim * 2)  # q, o + k, v
    attention = 2 * 2 * heads * head_dim * tokens * (tokens + 1) / 2  # QK^T and AV, causal half
    return float(projections + mlp_flops(tokens, cfg, layer) + attention)


def prefill_flops(tokens_per_layer: list[int], cfg) -> float:
    """LLM prefill FLOPs for one window (encoders excluded: they are the same for every method);
    the LM head runs on the last position only. Entries past the decoder's depth are extra layers a
    pruner ran (EchoingPixels' sieve copies layers 0, 1, ...), counted as the layer they copy."""
    depth = cfg.num_hidden_layers
    return (sum(layer_flops(n, cfg, i % depth) for i, n in enumerate(tokens_per_layer))
            + 2 * cfg.hidden_size * cfg.vocab_size)
