"""Prefill and greedy/sampled/beam-search decoding over a Hugging Face decoder stack, with token-pruning hooks.

The model adapters (e.g. qwen2_5_omni.py) turn a batch into merged embeddings, original position ids
and a modality map; this module runs the decoder layers itself so that tokens can be physically
removed before the LLM or between layers during prefill. Design points:

- Kept tokens keep their original (multimodal RoPE) position ids; nothing is renumbered.
- After a prune step every sample is re-packed to the left (left padding), and each layer remembers
  the key-padding mask of the prompt it cached, so decoding works with a different cache length per
  layer and per sample.
- Decoding continues at max(prompt position) + 1 per sample, i.e. the unpruned sequence's rope delta.
- Masks are additive float masks (valid for "eager" and "sdpa"); for "flash_attention_2" the 2-D
  key-padding mask is passed and position_ids are withheld so gaps are not read as packed sequences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import torch

from operators.models.repeats import RepeatedSentenceBan

# Modality codes used in every `modality` tensor.
TEXT, VIDEO, AUDIO, PAD = 0, 1, 2, 3


@dataclass
class TokenState:
    """The prompt as it flows through prefill: one row per sample, left padded."""

    hidden: torch.Tensor  # (B, L, D)
    position_ids: torch.Tensor  # (3, B, L) original multimodal RoPE ids
    valid: torch.Tensor  # (B, L) bool, False on padding
    modality: torch.Tensor  # (B, L) int8 codes above
    source_index: torch.Tensor  # (B, L) index of each token in its sample's unpruned prompt (-1 on padding)
    # Qwen3-Omni's DeepStack: (levels, B, L, D) added to the hidden states after layers 0..levels-1 (zero
    # off the video tokens). It travels with the tokens, so a kept video token gets its own rows.
    deepstack: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.valid.sum(dim=1)

    def media_indices(self, b: int) -> torch.Tensor:
        """Positions of sample b's video and audio tokens: the pool that pruners choose from."""
        media = (self.modality[b] == VIDEO) | (self.modality[b] == AUDIO)
        return torch.nonzero(self.valid[b] & media).flatten()

    def text_indices(self, b: int) -> torch.Tensor:
        return torch.nonzero(self.valid[b] & (self.modality[b] == TEXT)).flatten()

    def gather(self, keep: list[torch.Tensor]) -> "TokenState":
        """Keep the given per-sample positions (indices into the current L axis), re-packed to the left."""
        batch = self.hidden.shape[0]
        new_len = max(int(k.numel()) for k in keep)
        device = self.hidden.device
        idx = torch.zeros(batch, new_len, dtype=torch.long, device=device)
        valid = torch.zeros(batch, new_len, dtype=torch.bool, device=device)
        for b, k in enumerate(keep):
            k = torch.sort(k.to(device)).values
            idx[b, new_len - k.numel():] = k
            valid[b, new_len - k.numel():] = True
        hidden = torch.gather(self.hidden, 1, idx[..., None].expand(-1, -1, self.hidden.shape[-1]))
        pos = torch.gather(self.position_ids, 2, idx[None].expand(3, -1, -1))
        modality = torch.gather(self.modality, 1, idx).masked_fill(~valid, PAD)
        source = torch.gather(self.source_index, 1, idx).masked_fill(~valid, -1)
        pos = pos.masked_fill(~valid[None], 1)
        deepstack = None
        if self.deepstack is not None:
            levels, d = self.deepstack.shape[0], self.deepstack.shape[-1]
            deepstack = torch.gather(self.deepstack, 2, idx[None, ..., None].expand(levels, -1, -1, d))
            deepstack = deepstack.masked_fill(~valid[None, ..., None], 0)
        return TokenState(hidden, pos, valid, modality, source, deepstack)


@dataclass
class PruneContext:
    """What a pruning hook sees at one hook point."""

    layer: int  # index of the decoder layer about to run (0 = before the LLM)
    num_layers: int
    state: TokenState
    decoder: "PrunableDecoder"
    cache: object
    last_query_scores: Callable[[], torch.Tensor]  # (B, L) attention of the last prompt token, prev. layer
    extras: dict = field(default_factory=dict)  # per-batch inputs and scratch space shared by all hook calls


class PruneHook(Protocol):
    def layers(self, num_layers: int) -> list[int]:
        """Decoder layer indices before which `select` is called (0 means on the merged embeddings)."""

    def select(self, ctx: PruneContext) -> list[torch.Tensor] | None:
        """Per-sample indices (into the current sequence) to keep, or None to keep everything."""


@dataclass
class PrefillResult:
    logits: torch.Tensor  # (B, V) next-token logits after the prompt
    cache: object
    layer_valid: list[torch.Tensor]  # per layer: (B, L_layer) key-padding mask of the cached prompt
    next_position: torch.Tensor  # (B,) first decode position
    kept_per_layer: list[torch.Tensor]  # per layer: (B, 3) kept [text, video, audio] counts
    final_state: TokenState  # the prompt as the last layer saw it (source_index tells which tokens)
    seconds: float


class PrunableDecoder:
    """Drives one HF causal decoder stack (layers + rotary + norm + head) token by token."""

    def __init__(self, layers, rotary_emb, norm, lm_head, embed_tokens, attn_implementation: str):
        self.layers = list(layers)
        self.rotary_emb = rotary_emb
        self.norm = norm
        self.lm_head = lm_head
        self.embed_tokens = embed_tokens
        self.attn_implementation = attn_implementation or "sdpa"

    @property
    def text_config(self):
        """The decoder's text config (what trained pruners build their nets from)."""
        return self.layers[0].self_attn.config

    @property
    def flash(self) -> bool:
        return "flash" in self.attn_implementation

    # ---- masks -------------------------------------------------------------------------------
    def _mask(self, valid_keys: torch.Tensor, q_len: int, dtype) -> torch.Tensor:
        """Causal + key-padding mask for the last q_len queries over all keys."""
        if self.flash:
            return valid_keys.long()
        kv_len = valid_keys.shape[1]
        if self.attn_implementation == "sdpa" and q_len in (1, kv_len) and bool(valid_keys.all()):
            return None  # lets SDPA use its causal fast path (no padding, square or single-query)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=valid_keys.device)
        k_pos = torch.arange(kv_len, device=valid_keys.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None] & valid_keys[:, None, :]  # (B, q, kv)
        # Fully padded query rows must still see one key, or softmax gives NaN.
        allowed = allowed | (~allowed.any(-1, keepdim=True) & (k_pos[None, None] == kv_len - 1))
        mask = torch.zeros(allowed.shape, dtype=dtype, device=valid_keys.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def _run_layer(self, i, hidden, cos_sin, mask, cache):
        return self.layers[i](
            hidden,
            attention_mask=mask,
            position_embeddings=cos_sin,
            position_ids=None,  # positions are already in cos/sin; None keeps FA2 from "unpacking" gaps
            past_key_values=cache,
            use_cache=True,
        )

    # ---- scoring helpers for hooks --------------------------------------------------------------
    def last_query_attention(self, layer_idx: int, layer_input_last: torch.Tensor, cos_sin_last, cache,
                             valid: torch.Tensor) -> torch.Tensor:
        """Head-averaged softmax attention of the last prompt token over the cached keys of one layer.

        Computes a single query row (q_last · Kᵀ), never a full attention matrix.
        """
        attn = self.layers[layer_idx].self_attn
        normed = self.layers[layer_idx].input_layernorm(layer_input_last)  # (B, 1, D)
        bsz = normed.shape[0]
        q = attn.q_proj(normed).view(bsz, 1, -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3-Omni normalises each query head before RoPE
            q = attn.q_norm(q)
        q = q.transpose(1, 2)  # (B, H, 1, d)
        cos, sin = cos_sin_last
        q = q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)
        keys = cache.layers[layer_idx].keys  # (B, Hkv, L, d)
        keys = keys.repeat_interleave(attn.num_key_value_groups, dim=1)
        scores = (q @ keys.transpose(-1, -2)).squeeze(2) * attn.scaling  # (B, H, L)
        scores = scores.float().masked_fill(~valid[:, None, :], float("-inf"))
        return scores.softmax(-1).mean(1)  # (B, L)

    # ---- prefill ------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, state: TokenState, hook: PruneHook | None = None, extras: dict | None = None) -> PrefillResult:
        from transformers import DynamicCache

        start = time.perf_counter()
        state = replace(state)  # the loop rebinds fields; keep the caller's object intact
        num_layers = len(self.layers)
        hook_layers = set(hook.layers(num_layers)) if hook is not None else set()
        extras = extras if extras is not None else {}
        cache = DynamicCache()
        next_position = state.position_ids.masked_fill(~state.valid[None], -1).amax(dim=(0, 2)) + 1
        cos_sin = self.rotary_emb(state.hidden, state.position_ids)
        layer_valid, kept_per_layer = [], []
        prev_input_last = None
        for i in range(num_layers):
            if i in hook_layers:
                def scores(i=i, prev=prev_input_last, st=state, cs=cos_sin):
                    if i == 0:
                        raise ValueError("attention scores need at least one decoder layer before the hook")
                    last_cs = (cs[0][:, -1:], cs[1][:, -1:])
                    return self.last_query_attention(i - 1, prev, last_cs, cache, st.valid)

                ctx = PruneContext(i, num_layers, state, self, cache, scores, extras)
                keep = hook.select(ctx)
                if keep is not None:
                    state = state.gather(keep)
                    cos_sin = self.rotary_emb(state.hidden, state.position_ids)
            mask = self._mask(state.valid, state.hidden.shape[1], state.hidden.dtype)
            prev_input_last = state.hidden[:, -1:]
            state.hidden = _add_deepstack(self._run_layer(i, state.hidden, cos_sin, mask, cache), state.deepstack, i)
            layer_valid.append(state.valid)
            kept_per_layer.append(torch.stack([((state.modality == m) & state.valid).sum(1)
                                               for m in (TEXT, VIDEO, AUDIO)], dim=1))
        last = self.norm(state.hidden[:, -1:])
        logits = self.lm_head(last)[:, -1].float()
        return PrefillResult(logits, cache, layer_valid, next_position, kept_per_layer, state,
                             time.perf_counter() - start)

    # ---- training ----------------------------------------------------------------------------
    def caption_loss(self, state: TokenState, targets: list[torch.Tensor], pad_token_id: int,
                     key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced next-token loss of `targets` (1-D id tensors) after a (possibly pruned,
        left-packed) prompt, with gradients to state.hidden and the layers. Targets continue at
        max(prompt position) + 1 per sample, exactly where decoding would. `key_bias` (B, prompt length)
        is added to every layer's attention logits towards those prompt tokens (a soft keep mask)."""
        batch, prompt_len = state.valid.shape
        device = state.hidden.device
        length = max(int(t.numel()) for t in targets)
        ids = torch.full((batch, length), pad_token_id, dtype=torch.long, device=device)
        labels = torch.full((batch, length), -100, dtype=torch.long, device=device)
        for b, t in enumerate(targets):
            ids[b, :t.numel()], labels[b, :t.numel()] = t, t
        start = state.position_ids.masked_fill(~state.valid[None], -1).amax(dim=(0, 2)) + 1
        target_pos = (start[:, None] + torch.arange(length, device=device)[None]).expand(3, -1, -1)
        hidden = torch.cat([state.hidden, self.embed_tokens(ids).to(state.hidden.dtype)], dim=1)
        positions = torch.cat([state.position_ids, target_pos], dim=2)
        mask = self._mask(torch.cat([state.valid, labels != -100], dim=1), hidden.shape[1], hidden.dtype)
        if key_bias is not None:
            if mask is None:  # SDPA's causal fast path: spell the causal mask out to add the bias to it
                full = hidden.shape[1]
                mask = torch.full((full, full), torch.finfo(hidden.dtype).min, device=device).triu(1)
                mask = mask[None, None].expand(batch, 1, full, full)
            bias = torch.cat([key_bias.to(hidden.dtype), key_bias.new_zeros(batch, length).to(hidden.dtype)], 1)
            mask = mask + bias[:, None, None, :]
        cos_sin = self.rotary_emb(hidden, positions)
        deepstack = None
        if state.deepstack is not None:  # the caption tokens get no DeepStack rows
            deepstack = torch.nn.functional.pad(state.deepstack, (0, 0, 0, length))
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=None,
                           use_cache=False)
            hidden = _add_deepstack(hidden, deepstack, i)
        logits = self.lm_head(self.norm(hidden[:, prompt_len - 1:-1])).float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    # ---- decode ----------------------------------------------------------------------------------
    def _next_logits(self, token: torch.Tensor, position: torch.Tensor, layer_valid: list[torch.Tensor],
                     generated: torch.Tensor, cache) -> torch.Tensor:
        """Feed one token per row at its position; the next-token logits (rows, V)."""
        hidden = self.embed_tokens(token)[:, None].to(self.embed_tokens.weight.dtype)
        pos = position.view(1, -1, 1).expand(3, -1, -1)
        cos_sin = self.rotary_emb(hidden, pos)
        masks: dict[int, torch.Tensor] = {}  # layers that cached the same prompt share one mask
        for i in range(len(self.layers)):
            key = id(layer_valid[i])
            if key not in masks:
                masks[key] = self._mask(torch.cat([layer_valid[i], generated], dim=1), 1, hidden.dtype)
            hidden = self._run_layer(i, hidden, cos_sin, masks[key], cache)
        return self.lm_head(self.norm(hidden))[:, -1].float()

    @torch.no_grad()
    def decode(self, prefill: PrefillResult, max_new_tokens: int, eos_token_ids: list[int],
               temperature: float = 0.0, generators: list[torch.Generator] | None = None,
               num_beams: int = 1, length_penalty: float = 1.0,
               repeat_ban: RepeatedSentenceBan | None = None) -> list[list[int]]:
        """Greedy (temperature 0), sampled, or beam-search decoding (num_beams > 1). Sampling uses one
        generator per row so a row's caption does not depend on the other rows of its batch. With a
        repeat_ban, no caption ends a sentence that it has already said."""
        if num_beams > 1:
            if temperature > 0:
                raise ValueError("beam search is deterministic: use temperature 0 with num_beams > 1")
            return self._beam_search(prefill, max_new_tokens, eos_token_ids, num_beams, length_penalty, repeat_ban)
        logits, cache = prefill.logits, prefill.cache
        batch = logits.shape[0]
        device = logits.device
        position = prefill.next_position.clone()
        eos = torch.tensor(eos_token_ids, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        out: list[list[int]] = [[] for _ in range(batch)]
        generated = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            if repeat_ban is not None:
                _ban(logits, [repeat_ban.banned(seq) if not finished[b] else [] for b, seq in enumerate(out)])
            token = _pick(logits, temperature, generators)
            for b in range(batch):
                if not finished[b]:
                    out[b].append(int(token[b]))
            finished |= torch.isin(token, eos)
            if bool(finished.all()):
                break
            generated = torch.cat([generated, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)
            logits = self._next_logits(token, position, prefill.layer_valid, generated, cache)
            position = position + 1
        return [[t for t in seq if t not in eos_token_ids] for seq in out]

    def _beam_search(self, prefill: PrefillResult, max_new_tokens: int, eos_token_ids: list[int],
                     num_beams: int, length_penalty: float,
                     repeat_ban: RepeatedSentenceBan | None = None) -> list[list[int]]:
        """Keep the num_beams best partial captions of each row. A caption that ends is scored by its
        summed log-probability over its length ** length_penalty (so longer captions are not penalised
        for being long); a row is done when it holds num_beams ended captions and no live beam could
        score better. The prompt cache is copied per beam and reordered after each step; a row that is done
        leaves the batch (its beams stop computing)."""
        k = num_beams
        batch = prefill.logits.shape[0]
        device = prefill.logits.device
        cache = prefill.cache
        cache.batch_repeat_interleave(k)
        expanded: dict[int, torch.Tensor] = {}
        layer_valid = [expanded.setdefault(id(v), v.repeat_interleave(k, dim=0)) for v in prefill.layer_valid]
        position = prefill.next_position.repeat_interleave(k)
        logits = prefill.logits.repeat_interleave(k, dim=0)
        # Only the first beam of a row is live at the start, or all k would pick the same token.
        beam_scores = torch.full((batch, k), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0
        tokens = torch.zeros(batch * k, 0, dtype=torch.long, device=device)
        ended: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        done = [False] * batch
        live = list(range(batch))  # the rows still in the batch, in batch order
        eos = set(eos_token_ids)
        for step in range(max_new_tokens):
            n = len(live)
            vocab = logits.shape[-1]
            log_probs = logits.log_softmax(-1)
            if repeat_ban is not None:  # after the softmax, so a beam pays for the probability it loses
                _ban(log_probs, [repeat_ban.banned(seq) for seq in tokens.tolist()])
            totals = (beam_scores.view(-1, 1) + log_probs).view(n, k * vocab)
            # Enough candidates that k of them are not end tokens, even if every beam's best few are.
            top_scores, top_index = totals.topk((len(eos) + 1) * k, dim=1)
            next_beam = torch.zeros(n, k, dtype=torch.long, device=device)
            next_token = torch.full((n, k), eos_token_ids[0], dtype=torch.long, device=device)
            next_scores = torch.full((n, k), float("-inf"), device=device)
            for i, b in enumerate(live):
                filled = 0
                for rank, (score, index) in enumerate(zip(top_scores[i].tolist(), top_index[i].tolist())):
                    beam, token = divmod(index, vocab)
                    if token in eos:
                        if rank < k:  # an end token outside the best k would not have been kept either
                            text = tokens[i * k + beam].tolist()
                            self._keep_ended(ended[b], k, score / (len(text) + 1) ** length_penalty, text)
                        continue
                    next_beam[i, filled], next_token[i, filled], next_scores[i, filled] = beam, token, score
                    filled += 1
                    if filled == k:
                        break
                best_live = float(next_scores[i, 0]) / (step + 1) ** length_penalty
                done[b] = len(ended[b]) == k and min(s for s, _ in ended[b]) >= best_live
            if all(done):
                break
            staying = [i for i, b in enumerate(live) if not done[b]]
            rows = (next_beam + torch.arange(n, device=device)[:, None] * k)[staying].view(-1)
            tokens = torch.cat([tokens[rows], next_token[staying].view(-1, 1)], dim=1)
            beam_scores, next_token = next_scores[staying], next_token[staying]
            cache.reorder_cache(rows)  # also drops the beams of rows that are done
            if len(staying) < n:
                kept = torch.tensor([i * k + j for i in staying for j in range(k)], device=device)
                position = position[kept]
                shrunk: dict[int, torch.Tensor] = {}
                layer_valid = [shrunk.setdefault(id(v), v[kept]) for v in layer_valid]
                live = [live[i] for i in staying]
            if step + 1 == max_new_tokens:
                break
            generated = torch.ones(len(live) * k, step + 1, dtype=torch.bool, device=device)
            logits = self._next_logits(next_token.view(-1), position, layer_valid, generated, cache)
            position = position + 1
        for i, b in enumerate(live):  # rows cut by max_new_tokens: their live beams compete as they are
            if not done[b]:
                for j in range(k):
                    score = float(beam_scores[i, j])
                    if score > float("-inf"):
                        text = tokens[i * k + j].tolist()
                        self._keep_ended(ended[b], k, score / max(len(text), 1) ** length_penalty, text)
        return [max(hyps, key=lambda h: h[0])[1] if hyps else [] for hyps in ended]

    @staticmethod
    def _keep_ended(ended: list[tuple[float, list[int]]], k: int, score: float, text: list[int]) -> None:
        ended.append((score, text))
        if len(ended) > k:
            ended.remove(min(ended, key=lambda h: h[0]))


def _ban(logits: torch.Tensor, banned: list[list[int]]) -> None:
    for row, ids in enumerate(banned):
        if ids:
            logits[row, ids] = float("-inf")


def _add_deepstack(hidden: torch.Tensor, deepstack: torch.Tensor | None, layer: int) -> torch.Tensor:
    """After decoder layer `layer`, add its DeepStack level where the model has one (as transformers'
    Qwen3-Omni text model does, on the video tokens only: the other rows are zero)."""
    if deepstack is None or layer >= deepstack.shape[0]:
        return hidden
    return hidden + deepstack[layer].to(hidden.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _pick(logits: torch.Tensor, temperature: float, generators: list[torch.Generator] | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits / temperature).softmax(-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g).reshape(1)
                      for b, g in enumerate(generators)])
