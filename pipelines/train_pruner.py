"""Train a pruner (EchoingPixels' CS2 sieve or the AVEX exchange policy) for a frozen captioner.

    python -m pipelines.train_pruner --method echoingpixels|avex [--model embedded] [--data out/train/train]
    python -m pipelines.train_pruner --method avex --workers 4 --ray-address auto   # Ray Train

--data is a folder of clips (with an optional references.jsonl). If pipelines.train_captioner tokenized it
for a model with the same processor, its tokenized.pt cache is used; a missing folder is filled with the
synthetic world's train split.
Without references the target is the model's own full-token caption (self-distillation), so users can
train pruners for their own checkpoints on their own clips.
Every step draws a retention in [min_retention, max_retention], so one set of weights serves all budgets.

- echoingpixels: the sieve's N bidirectional layers start as the decoder's first N layers; its keep
  logits (z-scored within each modality, --sieve-per-modality) go through the rule inference uses
  (EchoingPixelsPruner: a joint top-k sets each modality's share, the best token of each stretch of each
  stream is kept; --sieve-selection topk is the paper code's plain joint top-k); the frozen LLM's caption
  loss reaches the scorer through a straight-through keep mask on the
  attention (sieve_step says how and why it is not the paper code's embedding scaling). --gumbel adds
  the paper code's Gumbel noise to the training top-k (off by default). The LLM is not fine-tuned: one
  shipped captioner serves every method.
- avex: the policy keeps what it keeps at inference (AvexPruner: each modality's proportional share,
  the best-scored token of each equal stretch of its stream); an exchange then swaps m low-confidence
  kept tokens (sampled from softmax(-logit) over the kept set) for m high-confidence dropped ones
  (softmax(logit) over the rest, either modality). Both sets are captioned greedily; the reward of a set
  is the clause F1 of its caption against the full-token caption and the reference (mean of the two).
  REINFORCE on the exchange with the unswapped set as baseline:
  loss = -(R(swapped) - R(kept)) * log p(exchange).

With --workers N >= 1 the same loop runs under Ray Train's TorchTrainer (DDP, gloo on CPU, nccl on GPU);
rank 0 reports the weights as a Ray Train checkpoint and the driver copies them to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


WEIGHTS_FILE = "pruner.safetensors"


@dataclass(frozen=True)
class PrunerTrainConfig:
    method: str = "avex"
    model: str = "embedded"
    data: str = "out/train/train"
    out: str = ""  # default: <model dir>/pruners/<method>.safetensors
    init: str = ""  # start from these weights (e.g. to go on training) instead of fresh ones
    n_train: int = 1024
    steps: int = 300
    batch_size: int = 8  # per worker
    lr: float = 1e-3
    min_retention: float = 0.08
    max_retention: float = 0.5
    sieve_layers: int = 1  # echoingpixels: bidirectional layers (the paper uses 4 of 28)
    sieve_per_modality: bool = True  # echoingpixels: z-score logits within each modality (learned.SieveNet)
    sieve_selection: str = "stratified"  # echoingpixels: "topk" = the paper code's rule (learned.SIEVE_SELECTIONS)
    gumbel: float = 0.0  # echoingpixels: Gumbel noise on the training top-k (code's SOFTMAX=gumbel); 0 = off
    swap_fraction: float = 0.15  # avex: share of the kept tokens exchanged per proposal
    temperature: float = 1.0  # avex: softmax temperature of the exchange draws
    proposals: int = 2  # avex: exchange proposals per sample and step (they share the baseline caption)
    max_new_tokens: int = 80
    seed: int = 0
    threads: int = 2
    max_minutes: float = 0.0  # 0 = run all steps
    workers: int = 0  # 0 = this process; N >= 1 = Ray Train TorchTrainer with N workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    ray_address: str = ""


# ---- data -------------------------------------------------------------------------------------------
def load_windows(data: str, model_source: str, limit: int) -> list[dict]:
    """[{file, caption|None, inputs}]: the captioner's tokenized cache, or clips tokenized here."""
    from operators import tokenize as tok
    from operators.prepare import prepare_windows
    from operators.sources import list_inputs
    from pipelines.caption import preprocess_settings
    from pipelines.config import CaptionConfig
    from pipelines.train_captioner import _compact, cache_settings, stored_tokenization_key, tokenization_key

    folder = Path(data)
    cache = folder / "tokenized.pt"
    if not folder.exists():  # a fresh machine: make the synthetic world's train split first
        from pipelines.synthesize import synthesize

        synthesize(str(folder), limit, seed=0, split="train")
    if cache.is_file():
        # The cache holds the captioner's processor's tokens: only valid for a model saved with that processor.
        expected, stored = tokenization_key(cache_settings(Path(model_source)), Path(model_source)), \
            stored_tokenization_key(folder)
        if stored == expected:
            items = torch.load(cache, weights_only=False, mmap=True)
            return [_compact(item) for item in items[:limit]]
        print(f"{cache}: tokenized for another processor or settings ({stored or 'no key recorded'} != "
              f"{expected}); tokenizing the clips for {model_source}", flush=True)
    refs_file = folder / "references.jsonl"
    refs = {}
    if refs_file.is_file():
        refs = {json.loads(line)["file"]: json.loads(line)["caption"] for line in refs_file.open() if line.strip()}
    settings = preprocess_settings(CaptionConfig(model=model_source), model_source)
    out = []
    for row in list_inputs(str(folder), limit):
        name = Path(row["uri"]).name
        for window in prepare_windows(row, settings):
            if window["status"] == "ok":
                out.append({"file": name, "caption": refs.get(name), "inputs": tok.unpack(window["model_inputs"])})
    if not out:
        raise SystemExit(f"no usable clips in {data}")
    return out


# ---- shared pieces ----------------------------------------------------------------------------------
class FixedKeep:
    """A PruneHook that keeps precomputed per-sample index sets before the LLM."""

    def __init__(self, keep: list[torch.Tensor]):
        self.keep = keep

    def layers(self, num_layers: int) -> list[int]:
        return [0]

    def select(self, ctx) -> list[torch.Tensor]:
        return self.keep


def greedy_captions(thinker, emb, keep: list[torch.Tensor] | None, max_new_tokens: int) -> list[str]:
    prefill = thinker.decoder.prefill(emb.state, hook=FixedKeep(keep) if keep is not None else None,
                                      extras=emb.extras)
    tokens = thinker.decoder.decode(prefill, max_new_tokens, thinker.eos_token_ids)
    return [t.strip() for t in thinker.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def clause_f1(prediction: str, target: str) -> float:
    """F1 between the sets of clauses of two captions (the synthetic world's fact F1 when both are in it)."""
    from operators.synth.grammar import split_clauses

    pred, ref = set(split_clauses(prediction)), set(split_clauses(target))
    if not pred and not ref:
        return 1.0
    return 2 * len(pred & ref) / (len(pred) + len(ref))


def sieve_step(net, thinker, emb, items, cfg, retention: float, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """EchoingPixels: straight-through top-k over the joint pool, LM loss through the frozen LLM.

    The straight-through factor m = hard - soft.detach() + soft acts on the attention mask, not on the
    embeddings: every prompt token stays in the sequence and each layer adds log(max(m, KEEP_FLOOR)) to
    the attention logits towards it. In value, dropped tokens get a bias of log(1e-9) (no query can see
    them: the forward is the pruned forward); in gradient, d/d soft of a dropped token's bias is the
    first-order effect of letting the LLM attend to it, measured with the current kept set. The paper
    code scales the kept embeddings instead; with a frozen LLM that only says whether a kept token should
    be louder, never whether a dropped one should be kept, and its sieve learned to drop all audio."""
    from types import SimpleNamespace

    from operators.models.decoder import AUDIO
    from operators.pruning.base import av_counts
    from operators.pruning.budget import WindowBudget
    from operators.pruning.learned import EchoingPixelsPruner

    state = emb.state
    logits = net(state.hidden, state.position_ids, state.valid, state.modality, thinker.decoder.rotary_emb)
    ctx = SimpleNamespace(state=state, extras=emb.extras)
    settings = {"selection": cfg.sieve_selection}  # train_loop gives the net the same setting
    keep_mask = torch.ones(state.valid.shape, dtype=logits.dtype, device=logits.device)
    audio_share = []
    for b in range(len(items)):
        cand = state.media_indices(b)
        scores = logits[b, cand].float()
        if cfg.gumbel > 0:  # explore: a token the sieve ranks low is still kept now and then
            # Noise on standardised logits: the exploration does not fade as the logits' scale grows.
            uniform = torch.rand(scores.shape, generator=gen).clamp(1e-9, 1 - 1e-9).to(scores.device)
            scores = (scores - scores.mean()) / scores.std().clamp(min=1e-6).detach()
            scores = scores - cfg.gumbel * torch.log(-torch.log(uniform))
        # The hard set is what inference keeps (EchoingPixelsPruner's rule) at a fixed budget, no caps.
        ranked = torch.full_like(logits[b], float("-inf"), dtype=torch.float32, requires_grad=False)
        ranked[cand] = scores.detach()
        chosen = EchoingPixelsPruner.keep_from_scores(settings, ctx, b, ranked,
                                                      WindowBudget(retention, *av_counts(ctx, b)))
        hard = torch.isin(cand, chosen).to(scores.dtype)
        audio_share.append(float((state.modality[b, cand] == AUDIO)[hard.bool()].float().mean()))
        soft = scores.softmax(-1)
        # (soft - soft.detach()) is exactly 0 in value. Written as hard - soft.detach() + soft, a dropped token
        # with a large soft (a stratum's runner-up) rounds 1e-9 - 0.5 + 0.5 to 0 in float32: log(0), NaN.
        m = hard.clamp(min=KEEP_FLOOR) + (soft - soft.detach())
        keep_mask = keep_mask.index_put((torch.full_like(cand, b), cand), m.to(keep_mask.dtype))
    targets = [_target_ids(thinker, item) for item in items]
    loss = thinker.decoder.caption_loss(state, targets, thinker.pad_token_id, key_bias=keep_mask.log())
    return loss, {"lm_loss": loss.item(), "audio_share": sum(audio_share) / len(audio_share)}


KEEP_FLOOR = 1e-9  # attention weight factor of a dropped token in training: removed in value, alive in gradient


def _target_ids(thinker, item) -> torch.Tensor:
    from pipelines.train_captioner import caption_ids

    return caption_ids(thinker.processor.tokenizer, item["target"]).to(thinker.device)


def plackett_luce_log_prob(logits: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """log P(drawing `order`, one index after another without replacement, each draw a softmax over the
    logits not drawn yet). The sum of per-token log-softmax terms over all logits is not this: it prices
    every draw as if none had been drawn before."""
    remaining = torch.ones_like(logits, dtype=torch.bool)
    terms = []
    for index in order:
        terms.append(logits[index] - logits.masked_fill(~remaining, float("-inf")).logsumexp(-1))
        remaining = remaining.clone()
        remaining[index] = False
    return torch.stack(terms).sum() if terms else logits.sum() * 0


def avex_step(net, thinker, emb, items, cfg, retention: float, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """AVEX: `cfg.proposals` exchange proposals per sample, each rewarded by the change in caption quality
    it causes against the set the policy keeps at inference (the baseline)."""
    from types import SimpleNamespace

    from operators.pruning.base import av_counts
    from operators.pruning.budget import WindowBudget
    from operators.pruning.learned import AvexPruner

    state = emb.state
    logits = net(state.hidden, state.position_ids, state.valid, state.modality)
    ctx = SimpleNamespace(state=state, extras=emb.extras)
    base_keep, plans = [], []
    for b in range(len(items)):
        # The baseline is the set inference keeps (AvexPruner: the best token of each stretch of each stream).
        cand = state.media_indices(b)
        plan = WindowBudget(retention, *av_counts(ctx, b))  # a fixed budget, no caps
        chosen = AvexPruner.keep_from_scores({}, ctx, b, logits[b].detach(), plan)
        is_kept = torch.isin(cand, chosen)
        base_keep.append(chosen)
        plans.append((cand, torch.nonzero(is_kept).flatten(), torch.nonzero(~is_kept).flatten()))
    with torch.no_grad():
        base = greedy_captions(thinker, emb, base_keep, cfg.max_new_tokens)
    reward = lambda caption, item: 0.5 * (clause_f1(caption, item["full"]) +  # noqa: E731
                                         clause_f1(caption, item["target"]))
    r_base = torch.tensor([reward(c, it) for c, it in zip(base, items)])
    losses, gains = [], []
    for _ in range(cfg.proposals):
        swap_keep, log_probs = [], []
        for b, (cand, kept, dropped) in enumerate(plans):
            scores = logits[b, cand].float()
            m = min(max(1, round(cfg.swap_fraction * kept.numel())), dropped.numel())
            if m == 0:
                swap_keep.append(base_keep[b])
                log_probs.append(scores.sum() * 0)
                continue
            # Log-probabilities by logsumexp, never log(p): a confident policy gives some tokens p = 0 in
            # float32, and log(0) would turn the whole update into NaN.
            out_logits = -scores[kept] / cfg.temperature  # low confidence among the kept goes out
            in_logits = scores[dropped] / cfg.temperature  # high confidence among the rest comes in
            draw = lambda logits: torch.multinomial(  # noqa: E731  (floored: every token stays drawable)
                logits.detach().log_softmax(-1).exp().clamp(min=1e-12).cpu(), m, generator=gen).to(cand.device)
            out, inn = draw(out_logits), draw(in_logits)
            # multinomial without replacement draws in order: the exchange's probability is Plackett-Luce's
            log_probs.append(plackett_luce_log_prob(out_logits, out) + plackett_luce_log_prob(in_logits, inn))
            stay = torch.ones(kept.numel(), dtype=torch.bool, device=cand.device)
            stay[out] = False
            swap_keep.append(torch.cat([state.text_indices(b), cand[kept[stay]], cand[dropped[inn]]]))
        with torch.no_grad():
            swapped = greedy_captions(thinker, emb, swap_keep, cfg.max_new_tokens)
        r_swap = torch.tensor([reward(c, it) for c, it in zip(swapped, items)])
        advantage = (r_swap - r_base).to(logits.device)
        losses.append(-(advantage * torch.stack(log_probs)).mean())
        gains.append(advantage)
    gain = torch.cat(gains)
    return torch.stack(losses).mean(), {"reward": float(r_base.mean()), "gain": float(gain.mean()),
                                        "changed": float((gain != 0).float().mean())}


# ---- the loop (one process, or one Ray Train worker) --------------------------------------------------
def train_loop(config: dict) -> dict:
    from operators.models.fingerprint import model_version
    from operators.models.qwen2_5_omni import OmniThinker, resolve_model_source
    from operators.pruning.learned import PolicyNet, SieveNet, load_net

    cfg = PrunerTrainConfig(**config)
    rank, world = 0, 1
    if cfg.workers >= 1:
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    torch.set_num_threads(max(1, cfg.threads // max(world, 1)))
    source = resolve_model_source(cfg.model)
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    thinker = OmniThinker(source, device=device, dtype="float32")
    thinker.model.requires_grad_(False)
    text_config = thinker.model.config.get_text_config()
    if cfg.init:  # go on training earlier weights
        net = load_net(cfg.init, text_config).train()
        if net.method != cfg.method:
            raise SystemExit(f"--init {cfg.init} holds {net.method} weights, not {cfg.method}")
        if net.method == "echoingpixels":  # the weights will hold the rule they are now trained for
            net.settings["selection"] = cfg.sieve_selection
    elif cfg.method == "echoingpixels":
        net = SieveNet(text_config, cfg.sieve_layers, cfg.sieve_per_modality, cfg.sieve_selection)
        net.init_from_decoder(thinker.decoder.layers)
    elif cfg.method == "avex":
        net = PolicyNet(text_config.hidden_size)
    else:
        raise SystemExit(f"unknown method {cfg.method!r} (echoingpixels or avex)")
    net = net.to(device)
    core = net
    if cfg.workers >= 1:
        import ray.train.torch

        net = ray.train.torch.prepare_model(net)
    items = load_windows(cfg.data, source, cfg.n_train)[rank::world]
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng, gen = random.Random(cfg.seed + rank), torch.Generator().manual_seed(cfg.seed + rank)
    full_captions: dict[int, str] = {}
    history, start = [], time.perf_counter()
    for step in range(cfg.steps):
        picks = rng.sample(range(len(items)), min(cfg.batch_size, len(items)))
        batch = [items[i] for i in picks]
        emb = thinker.embed(thinker.collate([it["inputs"] for it in batch]))
        todo = [i for i in picks if i not in full_captions]
        if todo and (cfg.method == "avex" or any(items[i]["caption"] is None for i in todo)):
            sub = thinker.embed(thinker.collate([items[i]["inputs"] for i in todo]))
            for i, caption in zip(todo, greedy_captions(thinker, sub, None, cfg.max_new_tokens)):
                full_captions[i] = caption
        rows = [{"full": full_captions.get(i, ""), "target": items[i]["caption"] or full_captions[i]}
                for i in picks]
        retention = rng.uniform(cfg.min_retention, cfg.max_retention)
        if cfg.method == "echoingpixels":
            loss, stats = sieve_step(net, thinker, emb, rows, cfg, retention, gen)
        else:
            loss, stats = avex_step(net, thinker, emb, rows, cfg, retention, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        # One bad batch must not turn the weights into NaN. (DDP workers hold the same averaged gradient,
        # so they all skip the same steps.)
        finite = bool(torch.isfinite(norm))
        if finite:
            opt.step()
        history.append({"step": step + 1, "retention": round(retention, 3), "skipped": float(not finite), **stats})
        if rank == 0 and ((step + 1) % 10 == 0 or step + 1 == cfg.steps):
            recent = history[-10:]
            means = {k: round(sum(h[k] for h in recent) / len(recent), 4) for k in (*stats, "skipped")}
            print(json.dumps({"step": step + 1, **means, "minutes": round((time.perf_counter() - start) / 60, 1)}),
                  flush=True)
        late = time.perf_counter() - start > cfg.max_minutes * 60
        # Under Ray Train every worker must stop at the same step (DDP's all-reduce would wait forever).
        if cfg.max_minutes > 0 and (_any_worker(late, device) if cfg.workers >= 1 else late):
            break
    report = {"train_config": asdict(cfg), "steps_done": len(history), "model_version": model_version(source),
              "minutes": round((time.perf_counter() - start) / 60, 1), "workers": world,
              "last": history[-20:]}
    if cfg.workers >= 1:
        import ray.train
        from ray.train import Checkpoint

        from operators.pruning.learned import save_net

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_net(core, Path(tmp) / WEIGHTS_FILE, report, report["model_version"])
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report({"steps_done": len(history)}, checkpoint=checkpoint)
    return {"net": core, "report": report}


def _any_worker(flag: bool, device: str) -> bool:
    """True on every Ray Train worker when it is true on any of them."""
    import torch.distributed as dist

    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def ray_train_worker(config: dict) -> None:
    """TorchTrainer's per-worker function: the weights leave through the Ray Train checkpoint."""
    train_loop(config)


def output_path(cfg: PrunerTrainConfig) -> Path:
    from operators.models.qwen2_5_omni import resolve_model_source
    from operators.pruning.learned import default_weights

    return Path(cfg.out) if cfg.out else default_weights(resolve_model_source(cfg.model), cfg.method)


def train(cfg: PrunerTrainConfig) -> Path:
    from operators.pruning.learned import save_net

    out = output_path(cfg)
    if cfg.workers < 1:
        result = train_loop(asdict(cfg))
        save_net(result["net"], out, result["report"], result["report"]["model_version"])
    else:
        run_distributed(cfg, out)
    print(json.dumps({"saved": str(out), "method": cfg.method}), flush=True)
    return out


def run_distributed(cfg: PrunerTrainConfig, out: Path) -> None:
    import shutil

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=cfg.ray_address or None)
    storage = tempfile.mkdtemp(prefix="avsieve-train-pruner-")
    trainer = TorchTrainer(
        ray_train_worker,
        train_loop_config=asdict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"train-pruner-{cfg.method}", storage_path=storage),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as folder:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(folder) / WEIGHTS_FILE, out)


def build_parser() -> argparse.ArgumentParser:
    from pipelines.config import flat_parser

    return flat_parser(PrunerTrainConfig(), "avsieve train-pruner", __doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    train(PrunerTrainConfig(**vars(build_parser().parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
