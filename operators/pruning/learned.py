"""Trained pre-LLM pruners: EchoingPixels' Cross-Modal Semantic Sieve (CS2) and AVEX-style exchange policy.

Both score every audio and video token of the merged embeddings and keep the budget's worth of them
before the first decoder layer. Each keeps per modality the best-scored token of each stretch of its
stream (operators/pruning/base.select_stratified); echoingpixels lets one top-k over the joint
audio+video pool set how many tokens each modality gets (base.joint_split), avex splits in proportion.
Sieve weights saved with `"selection": "topk"` (and those from before this setting) keep the paper code's
rule instead: one top-k over the joint pool. They differ in what scores the tokens and in how the scorer
is trained (pipelines/train_pruner.py):

- SieveNet (echoingpixels): N bidirectional copies of the model's own decoder layers, initialised from
  layers 0..N-1, run over the whole prompt; then RMSNorm -> Linear(D, D) -> SiLU -> Linear(D, 1) on
  each audio/video token. Trained through the frozen LLM's caption loss with a straight-through top-k.
  Its N layers run over every token, so its prefill FLOPs include them (reported, not hidden). With
  `per_modality` (avsieve's choice, recorded in the weights) its logits become z-scores within each
  modality before the one joint top-k: see standardise_per_modality.
- PolicyNet (avex): a light per-token MLP over [token, token - its modality's mean, modality], about
  D*128 weights; its cost is negligible next to one decoder layer. Trained by policy gradient on
  token exchanges (pipelines/train_pruner.py says how).

Weights live in one safetensors file with the net's settings in its metadata; the embedded model ships
them in `<model dir>/pruners/<method>.safetensors`, which is where --pruner echoingpixels|avex look by
default.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from operators.models.decoder import AUDIO, VIDEO, PruneContext
from operators.pruning.base import (Pruner, av_counts, joint_split, keep_all, modality_split, select_joint,
                                    select_stratified)

WEIGHTS_DIR = "pruners"
SIEVE_SELECTIONS = ("topk", "stratified")  # the paper code's joint top-k; avsieve's (base.select_stratified)
MODALITY_FLOOR = 0.75  # stratified sieve: each modality keeps at least this much of its proportional share


class PrunerWeightsError(FileNotFoundError):
    pass


def _rms_norm(dim: int) -> nn.Module:
    return nn.RMSNorm(dim, eps=1e-6)


class SieveNet(nn.Module):
    """CS2: bidirectional layers of the model's own decoder-layer class, then an MLP scorer."""

    method = "echoingpixels"

    def __init__(self, text_config, num_layers: int = 1, per_modality: bool = False, selection: str = "topk"):
        super().__init__()
        config = copy.deepcopy(text_config)
        config._attn_implementation = "sdpa"  # needs an explicit non-causal mask; FA2 has no such path
        if selection not in SIEVE_SELECTIONS:
            raise ValueError(f"sieve selection {selection!r}: one of {SIEVE_SELECTIONS}")
        self.settings = {"num_layers": num_layers, "hidden_size": config.hidden_size, "per_modality": per_modality,
                         "selection": selection}
        layer_class = _decoder_layer_class(config)
        self.layers = nn.ModuleList(layer_class(config, layer_idx=i) for i in range(num_layers))
        d = config.hidden_size
        self.scorer = nn.Sequential(_rms_norm(d), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 1))

    def init_from_decoder(self, decoder_layers) -> None:
        """EchoingPixels' one-to-one initialisation: sieve layer i starts as decoder layer i."""
        for mine, theirs in zip(self.layers, decoder_layers):
            mine.load_state_dict(theirs.state_dict())

    def forward(self, hidden, position_ids, valid, modality, rotary_emb) -> torch.Tensor:
        """(B, L) keep logits; only audio/video positions are meaningful."""
        cos_sin = rotary_emb(hidden, position_ids)
        allowed = valid[:, None, None, :].expand(-1, 1, hidden.shape[1], -1)
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)  # key padding only: bidirectional
        h = hidden
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_embeddings=cos_sin, position_ids=None, use_cache=False)
        logits = self.scorer(h).squeeze(-1)
        return standardise_per_modality(logits, valid, modality) if self.settings["per_modality"] else logits


def _decoder_layer_class(text_config):
    """The decoder-layer class of the model family the text config belongs to (Qwen3-Omni: its MoE layer)."""
    if text_config.model_type == "qwen3_omni_moe_text":
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            Qwen3OmniMoeThinkerTextDecoderLayer,
        )

        return Qwen3OmniMoeThinkerTextDecoderLayer
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniDecoderLayer

    return Qwen2_5OmniDecoderLayer


def standardise_per_modality(logits, valid, modality) -> torch.Tensor:
    """Each sample's audio and video logits as z-scores within their modality, so the joint top-k compares
    how much a token stands out in its own stream. The frozen LLM's straight-through gradient rates each
    token alone; a redundant stream (a second of tone is 25 near-identical tokens) then loses every
    comparison, and raw logits learned that way ranked all audio below all video."""
    out = logits
    for code in (VIDEO, AUDIO):
        member = (valid & (modality == code)).to(logits.dtype)
        n = member.sum(1, keepdim=True).clamp(min=1)
        mean = (logits * member).sum(1, keepdim=True) / n
        std = (((logits - mean) ** 2 * member).sum(1, keepdim=True) / n).sqrt().clamp(min=1e-6)
        out = torch.where(member.bool(), (logits - mean) / std, out)
    return out


class PolicyNet(nn.Module):
    """AVEX keep policy: one small MLP per token, with its modality's mean as light context."""

    method = "avex"

    def __init__(self, hidden_size: int, width: int = 128):
        super().__init__()
        self.settings = {"hidden_size": hidden_size, "width": width}
        self.norm = _rms_norm(hidden_size)
        self.modality = nn.Embedding(3, width)  # TEXT, VIDEO, AUDIO codes
        self.proj = nn.Linear(2 * hidden_size, width)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, 1))

    def forward(self, hidden, position_ids, valid, modality, rotary_emb=None) -> torch.Tensor:
        h = self.norm(hidden)
        context = torch.zeros_like(h)
        for code in (VIDEO, AUDIO):
            member = (valid & (modality == code)).unsqueeze(-1).to(h.dtype)
            mean = (h * member).sum(1, keepdim=True) / member.sum(1, keepdim=True).clamp(min=1)
            context = context + member * mean
        code = modality.long().clamp(max=2)
        return self.out(self.proj(torch.cat([h, h - context], -1)) + self.modality(code)).squeeze(-1)


NETS = {SieveNet.method: SieveNet, PolicyNet.method: PolicyNet}


def build_net(method: str, text_config, settings: dict) -> nn.Module:
    if method == SieveNet.method:
        return SieveNet(text_config, settings.get("num_layers", 1), settings.get("per_modality", False),
                        settings.get("selection", "topk"))
    return PolicyNet(text_config.hidden_size, settings.get("width", 128))


def save_net(net: nn.Module, path: str | Path, report: dict | None = None, model_version: str | None = None) -> None:
    """Weights plus their settings, training report and the fingerprint of the captioner they were trained
    for (operators/models/fingerprint.py): loading them for another model version is refused."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in net.state_dict().items()}
    meta = {"method": net.method, "settings": json.dumps(net.settings), "report": json.dumps(report or {}),
            "model_version": model_version or ""}
    save_file(tensors, str(path), metadata=meta)


def weights_model_version(path: str | Path) -> str | None:
    """The captioner fingerprint a weights file was trained for (None: not recorded)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("model_version") or None


def check_weights_model(path: Path, method: str, model_version: str) -> None:
    recorded = weights_model_version(path)
    if recorded != model_version:
        made_for = f"model version {recorded}" if recorded else "an unrecorded model version"
        raise PrunerWeightsError(
            f"{path}: {method} weights trained for {made_for}, but the captioner is version {model_version}: "
            f"retrain them with `python -m pipelines.train_pruner --method {method} --model MODEL`, or pass "
            "--allow-foreign-pruner-weights to use them anyway (each row records them in pruner_weights_version)")


def load_net(path: str | Path, text_config) -> nn.Module:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    method, settings = meta.get("method"), json.loads(meta.get("settings", "{}"))
    if method not in NETS:
        raise PrunerWeightsError(f"{path}: not a pruner weights file (method {method!r})")
    if settings.get("hidden_size") != text_config.hidden_size:
        raise PrunerWeightsError(f"{path}: made for hidden size {settings.get('hidden_size')}, but the model's "
                                 f"is {text_config.hidden_size}; train weights for this model with "
                                 f"python -m pipelines.train_pruner --method {method} --model ...")
    net = build_net(method, text_config, settings)
    net.load_state_dict({k: v.float() for k, v in tensors.items()})
    return net.eval()


def default_weights(model_source: str, method: str) -> Path:
    return Path(model_source) / WEIGHTS_DIR / f"{method}.safetensors"


class LearnedPruner(Pruner):
    """A trained scorer's choice of audio and video tokens, before the LLM (keep_from_scores: the rule)."""

    def __init__(self, budget, weights: str | Path | None = None, model_source: str | None = None, net=None,
                 model_version: str | None = None, allow_foreign_weights: bool = False):
        """model_version: the captioner's fingerprint; weights trained for another are refused unless
        allow_foreign_weights (None: not checked, for nets handed over in training and tests)."""
        super().__init__(budget)
        self.net = net
        self.weights = Path(weights) if weights else (default_weights(model_source, self.name)
                                                      if model_source else None)
        if self.net is None and (self.weights is None or not self.weights.is_file()):
            raise PrunerWeightsError(
                f"no trained {self.name} weights at {self.weights}: train them with "
                f"`python -m pipelines.train_pruner --method {self.name} --model MODEL` "
                f"and pass --pruner-weights, or use the embedded model (it ships them)")
        self.weights_version = weights_model_version(self.weights) if self.net is None else None
        if self.net is None and model_version and not allow_foreign_weights:
            check_weights_model(self.weights, self.name, model_version)

    def layers(self, num_layers: int) -> list[int]:
        return [0]

    def _ensure_net(self, ctx: PruneContext) -> nn.Module:
        if self.net is None:
            text_config = ctx.decoder.text_config
            self.net = load_net(self.weights, text_config)
        state = ctx.state
        return self.net.to(device=state.hidden.device, dtype=state.hidden.dtype)

    def scores(self, ctx: PruneContext) -> torch.Tensor:
        net, state = self._ensure_net(ctx), ctx.state
        with torch.no_grad():
            return net(state.hidden, state.position_ids, state.valid, state.modality, ctx.decoder.rotary_emb)

    def select(self, ctx: PruneContext) -> list[torch.Tensor]:
        plans = self.plans(ctx)
        if not any(p.prunes(*av_counts(ctx, b)) for b, p in enumerate(plans)):
            return [keep_all(ctx, b) for b in range(len(plans))]
        scores = self.scores(ctx)
        self._record_cost(ctx)
        keep = []
        for b, plan in enumerate(plans):
            n_video, n_audio = av_counts(ctx, b)
            if not plan.prunes(n_video, n_audio):
                keep.append(keep_all(ctx, b))
                continue
            keep.append(self.keep_from_scores(self.net.settings, ctx, b, scores[b], plan))
        return keep

    @classmethod
    def keep_from_scores(cls, settings: dict, ctx: PruneContext, b: int, scores: torch.Tensor, plan) -> torch.Tensor:
        """The method's selection rule for sample b (training calls it too, to train on what inference keeps)."""
        raise NotImplementedError

    def _record_cost(self, ctx: PruneContext) -> None:
        """Extra full-length layers the scorer ran (added to prefill_flops by the adapter)."""
        extra = self.net.settings["num_layers"] if isinstance(self.net, SieveNet) else 0
        lengths = [int(n) for n in ctx.state.valid.sum(1)]
        ctx.extras["extra_layer_tokens"] = [[n] * extra for n in lengths]


class EchoingPixelsPruner(LearnedPruner):
    name = "echoingpixels"

    @classmethod
    def paper_retention(cls, num_layers: int) -> float:
        return 0.2  # the released code's default compression ratio

    @classmethod
    def keep_from_scores(cls, settings, ctx, b, scores, plan):
        n_video, n_audio = av_counts(ctx, b)
        if settings.get("selection", "topk") == "topk":  # the paper code's rule
            return select_joint(ctx, b, scores, plan.joint_keep(n_video, n_audio), plan)
        return select_stratified(ctx, b, scores, *joint_split(ctx, b, scores, plan, MODALITY_FLOOR))


class AvexPruner(LearnedPruner):
    name = "avex"

    @classmethod
    def paper_retention(cls, num_layers: int) -> float:
        return 0.4  # the retention of the paper's headline results

    @classmethod
    def keep_from_scores(cls, settings, ctx, b, scores, plan):
        # avsieve's choice (the paper's selection rule is not public): a proportional split, then strata.
        return select_stratified(ctx, b, scores, *modality_split(plan, *av_counts(ctx, b)))
