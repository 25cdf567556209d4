"""EchoingPixels' sieve, the AVEX policy, their training steps and Sync-RoPE, on the real thinker class."""

import copy

import pytest
import torch

from operators.models.decoder import AUDIO, VIDEO
from operators.models.qwen2_5_omni import OmniThinker, resolve_model_source
from operators.pruning import make_pruner
from operators.pruning.budget import FixedBudget
from operators.pruning.learned import (
    AvexPruner,
    EchoingPixelsPruner,
    PolicyNet,
    PrunerWeightsError,
    SieveNet,
    build_net,
    default_weights,
    load_net,
    save_net,
)
from pipelines.train_pruner import PrunerTrainConfig, avex_step, clause_f1, sieve_step
from tests.model_samples import make_sample


@pytest.fixture(scope="module")
def thinker():
    return OmniThinker(None)


@pytest.fixture(scope="module")
def emb(thinker):
    p = thinker.processor
    samples = [make_sample(p, 41), make_sample(p, 42, frames=12, seconds=6.0)]
    return thinker.embed(thinker.collate(samples))


def _text_config(thinker):
    return thinker.model.config.get_text_config()


def _scores(net, thinker, emb):
    s = emb.state
    return net(s.hidden, s.position_ids, s.valid, s.modality, thinker.decoder.rotary_emb)


def test_shipped_weights_exist_and_load(thinker):
    for method in ("echoingpixels", "avex"):
        path = default_weights(resolve_model_source("embedded"), method)
        net = load_net(path, _text_config(thinker))
        assert net.method == method


def test_missing_or_mismatched_weights_are_clear_errors(thinker, tmp_path):
    with pytest.raises(PrunerWeightsError, match="train_pruner"):
        make_pruner("avex", 0.2, model_source=str(tmp_path))
    other = _text_config(thinker).__class__(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                           num_key_value_heads=2, num_hidden_layers=1)
    save_net(PolicyNet(64), tmp_path / "small.safetensors")
    with pytest.raises(PrunerWeightsError, match="hidden size 64"):
        load_net(tmp_path / "small.safetensors", _text_config(thinker))
    assert load_net(tmp_path / "small.safetensors", other).method == "avex"


def test_save_load_roundtrip_keeps_scores(thinker, emb, tmp_path):
    torch.manual_seed(0)
    for net in (SieveNet(_text_config(thinker), 1), PolicyNet(_text_config(thinker).hidden_size)):
        # bf16 on disk: compare against the net after the same rounding
        net.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in net.state_dict().items()})
        save_net(net, tmp_path / f"{net.method}.safetensors")
        again = load_net(tmp_path / f"{net.method}.safetensors", _text_config(thinker))
        torch.testing.assert_close(_scores(again, thinker, emb), _scores(net, thinker, emb))



def test_per_modality_sieve_scores_are_z_scores_within_each_modality(thinker, emb, tmp_path):
    torch.manual_seed(0)
    net = SieveNet(_text_config(thinker), 1, per_modality=True)
    net.init_from_decoder(thinker.decoder.layers)
    save_net(net, tmp_path / "ep.safetensors")
    again = load_net(tmp_path / "ep.safetensors", _text_config(thinker))
    assert again.settings["per_modality"] is True
    s = emb.state
    scores = _scores(again, thinker, emb)
    for b in range(2):
        for code in (VIDEO, AUDIO):
            z = scores[b, s.valid[b] & (s.modality[b] == code)].float()
            assert abs(float(z.mean())) < 1e-3 and abs(float(z.std(correction=0)) - 1) < 1e-3
    # Weights saved before the setting existed keep their raw logits.
    assert build_net("echoingpixels", _text_config(thinker), {"num_layers": 1}).settings["per_modality"] is False

def test_sieve_starts_as_decoder_layers_and_is_bidirectional(thinker, emb):
    net = SieveNet(_text_config(thinker), 2)
    net.init_from_decoder(thinker.decoder.layers)
    for mine, theirs in zip(net.layers, thinker.decoder.layers):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name
    s = emb.state
    base = _scores(net, thinker, emb)
    # Change the last valid token of sample 0: in a causal stack no earlier score could move.
    hidden = s.hidden.clone()
    hidden[0, -1] += 1.0
    moved = net(hidden, s.position_ids, s.valid, s.modality, thinker.decoder.rotary_emb)
    candidates = (s.modality[0] == VIDEO) | (s.modality[0] == AUDIO)
    first = int(torch.nonzero(candidates)[0])
    assert not torch.allclose(moved[0, first], base[0, first])


def _kept_media(emb, prefill, b) -> set[int]:
    s, fin = emb.state, prefill.final_state
    offset = s.valid.shape[1] - int(s.valid[b].sum())
    kept = fin.source_index[b][fin.valid[b]] + offset
    return {int(i) for i in kept if int(s.modality[b, i]) in (VIDEO, AUDIO)}


def _prune_with_random_policy(pruner_cls, thinker, emb):
    """Prefill with pruner_cls at retention 0.25 around an untrained policy; (prefill, its scores)."""
    net = PolicyNet(_text_config(thinker).hidden_size)
    hook = pruner_cls(FixedBudget(0.25), net=net)
    prefill = thinker.decoder.prefill(emb.state, hook=hook, extras=dict(emb.extras))
    return prefill, _scores(net, thinker, emb)


def test_echoingpixels_keeps_its_top_scores_over_the_joint_pool(thinker, emb):
    prefill, scores = _prune_with_random_policy(EchoingPixelsPruner, thinker, emb)
    s = emb.state
    for b in range(2):
        cand = s.media_indices(b)
        k = round(0.25 * cand.numel())
        assert _kept_media(emb, prefill, b) == set(cand[torch.topk(scores[b, cand], k).indices].tolist())


def _strata(emb, b, code, k):
    """A modality's tokens of sample b in time order, cut into k equal consecutive stretches."""
    s = emb.state
    idx = [int(i) for i in s.media_indices(b) if int(s.modality[b, i]) == code]
    idx.sort(key=lambda i: tuple(int(x) for x in s.position_ids[:, b, i]))
    out, start = [], 0
    for j in range(k):  # the first len % k stretches hold one token more
        size = len(idx) // k + (j < len(idx) % k)
        out.append(idx[start:start + size])
        start += size
    return out


def _assert_best_of_each_stretch(emb, kept, scores, b):
    s = emb.state
    for code in (VIDEO, AUDIO):
        k = sum(int(s.modality[b, i]) == code for i in kept)
        strata = _strata(emb, b, code, k)
        assert sum(map(len, strata)) == int(((s.modality[b] == code) & s.valid[b]).sum())
        for members in strata:  # exactly one token per stretch: its best-scored
            assert kept & set(members) == {max(members, key=lambda i: float(scores[b, i]))}


def test_avex_keeps_each_modalitys_share_and_the_best_token_of_each_stretch(thinker, emb):
    prefill, scores = _prune_with_random_policy(AvexPruner, thinker, emb)
    s = emb.state
    for b in range(2):
        kept = _kept_media(emb, prefill, b)
        cand = s.media_indices(b)
        assert len(kept) == round(0.25 * cand.numel())
        n_video = int((s.modality[b, cand] == VIDEO).sum())
        assert sum(int(s.modality[b, i]) == VIDEO for i in kept) == round(len(kept) * n_video / cand.numel())
        _assert_best_of_each_stretch(emb, kept, scores, b)


class _FixedScores(torch.nn.Module):
    def __init__(self, scores, selection):
        super().__init__()
        self.fixed, self.settings = scores, {"selection": selection}

    def forward(self, *args):
        return self.fixed


def test_stratified_sieve_lets_the_joint_pool_split_within_a_floor(thinker, emb):
    """A sieve that ranks every audio token above every video token: the paper's top-k keeps only audio;
    the stratified rule still gives video MODALITY_FLOOR of its share, one best token per stretch."""
    from operators.pruning.learned import MODALITY_FLOOR

    s = emb.state
    scores = torch.where(s.modality == AUDIO, 5.0, 0.0) + torch.rand(s.valid.shape, generator=torch.Generator().manual_seed(3))
    for selection in ("topk", "stratified"):
        net = _FixedScores(scores, selection)
        prefill = thinker.decoder.prefill(s, hook=EchoingPixelsPruner(FixedBudget(0.2), net=net), extras=dict(emb.extras))
        for b in range(2):
            kept = _kept_media(emb, prefill, b)
            cand = s.media_indices(b)
            n_video = int((s.modality[b, cand] == VIDEO).sum())
            k_video = sum(int(s.modality[b, i]) == VIDEO for i in kept)
            assert len(kept) == round(0.2 * cand.numel())
            if selection == "topk":
                assert k_video == max(0, len(kept) - (cand.numel() - n_video))
            else:
                share = round(len(kept) * n_video / cand.numel())
                assert k_video == int(MODALITY_FLOOR * share)
                _assert_best_of_each_stretch(emb, kept, scores, b)


def test_sieve_flops_include_its_layers(thinker):
    p = thinker.processor
    samples = [make_sample(p, 43)]
    ep = thinker.caption(samples, 1, hook=make_pruner("echoingpixels", 0.2,
                                                      model_source=resolve_model_source("embedded")))
    av = thinker.caption(samples, 1, hook=make_pruner("avex", 0.2, model_source=resolve_model_source("embedded")))
    assert ep[0]["video_tokens_kept"] + ep[0]["audio_tokens_kept"] == av[0]["video_tokens_kept"] + \
        av[0]["audio_tokens_kept"]
    assert ep[0]["prefill_flops"] > av[0]["prefill_flops"]


def _rows(thinker, emb):
    return [{"target": "a small red star moves up. a low tone plays.", "full": "a low tone plays."}] * 2


def test_sieve_step_sends_gradient_through_the_frozen_llm(thinker, emb):
    thinker.model.requires_grad_(False)
    net = SieveNet(_text_config(thinker), 1)
    net.init_from_decoder(thinker.decoder.layers)
    gen = torch.Generator().manual_seed(0)
    loss, _ = sieve_step(net, thinker, emb, _rows(thinker, emb), PrunerTrainConfig(), 0.3, gen)
    loss.backward()
    assert net.scorer[-1].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.layers.parameters())
    assert all(p.grad is None for p in thinker.model.parameters())



def test_sieve_training_explores_tokens_it_ranks_low(thinker, emb, monkeypatch):
    """--gumbel: training sometimes keeps what the sieve ranks last (here: all audio); without it, never."""
    s = emb.state
    logits = torch.where(s.modality == VIDEO, 5.0, 0.0).requires_grad_()
    kept_audio = []

    def caption_loss(state, targets, pad_id, key_bias):
        kept_audio.append(int(((state.modality == AUDIO) & state.valid & (key_bias > -1)).sum()))
        return (key_bias.sum() * 0).float()

    monkeypatch.setattr(thinker.decoder, "caption_loss", caption_loss)
    for gumbel in (0.0, 1.0):
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            sieve_step(lambda *args: logits, thinker, emb, _rows(thinker, emb),
                       PrunerTrainConfig(gumbel=gumbel, sieve_selection="topk"), 0.2, gen)
    assert kept_audio[:3] == [0, 0, 0] and min(kept_audio[3:]) > 0


def test_sieve_step_masks_a_confident_runner_up_exactly(thinker, emb, monkeypatch):
    """Stratified training drops the second of two tokens the sieve is sure of (same stretch): its keep
    factor must still be exactly KEEP_FLOOR, not a float32 cancellation to 0 (log 0: a NaN step)."""
    from pipelines.train_pruner import KEEP_FLOOR

    s = emb.state
    logits = torch.zeros(s.valid.shape)
    audio = torch.nonzero(s.valid[0] & (s.modality[0] == AUDIO)).flatten()
    logits[0, audio[:2]] = 30.0  # neighbours: one stretch at retention 0.02
    logits.requires_grad_()
    seen = {}

    def caption_loss(state, targets, pad_id, key_bias):
        seen["bias"] = key_bias
        return (key_bias.masked_fill(~state.valid, 0).sum() * 0).float()

    monkeypatch.setattr(thinker.decoder, "caption_loss", caption_loss)
    loss, _ = sieve_step(lambda *args: logits, thinker, emb, _rows(thinker, emb),
                         PrunerTrainConfig(sieve_selection="stratified"), 0.02, torch.Generator().manual_seed(0))
    bias = seen["bias"][0, audio[:2]].detach()
    assert sorted(bias.tolist()) == pytest.approx([float(torch.tensor(KEEP_FLOOR).log()), 0.0], abs=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_soft_keep_mask_gives_the_pruned_loss_and_a_gradient_to_dropped_tokens(thinker, emb):
    """sieve_step's straight-through mask: in value the LLM sees only the kept tokens; in gradient, every
    dropped token learns what attending to it would have done."""
    from pipelines.train_pruner import KEEP_FLOOR

    s = emb.state
    keep = [torch.cat([s.text_indices(b), s.media_indices(b)[::3]]) for b in range(2)]
    targets = [torch.tensor([40, 41, 42, 2]), torch.tensor([43, 2])]
    pruned = thinker.decoder.caption_loss(s.gather(keep), targets, thinker.pad_token_id)
    m = torch.full(s.valid.shape, KEEP_FLOOR)
    for b, k in enumerate(keep):
        m[b, k] = 1.0
    m.requires_grad_()
    masked = thinker.decoder.caption_loss(s, targets, thinker.pad_token_id, key_bias=m.log())
    torch.testing.assert_close(masked, pruned, atol=1e-4, rtol=1e-4)
    masked.backward()
    dropped = s.valid.clone()
    for b, k in enumerate(keep):
        dropped[b, k] = False
    assert bool((m.grad[dropped].abs() > 0).float().mean() > 0.9)

def test_avex_step_rewards_exchanges(thinker, emb, monkeypatch):
    """An exchange that makes the caption better pushes the policy towards it; one that changes nothing
    gives no gradient at all (captions stubbed: baseline empty, exchanged ones equal to the reference)."""
    import pipelines.train_pruner as tp

    rows = _rows(thinker, emb)
    torch.manual_seed(0)
    net = PolicyNet(_text_config(thinker).hidden_size)
    calls = []

    def captions(th, e, keep, n):
        calls.append(keep)
        return [""] * len(keep) if len(calls) == 1 else [r["full"] for r in rows]

    monkeypatch.setattr(tp, "greedy_captions", captions)
    cfg = PrunerTrainConfig(max_new_tokens=8)
    loss, stats = avex_step(net, thinker, emb, rows, cfg, 0.3, torch.Generator().manual_seed(0))
    assert set(stats) == {"reward", "gain", "changed"} and stats["gain"] > 0 and stats["changed"] == 1.0
    loss.backward()
    assert float(net.proj.weight.grad.abs().sum()) > 0
    net.zero_grad()
    monkeypatch.setattr(tp, "greedy_captions", lambda th, e, keep, n: [""] * len(keep))  # nothing changes
    loss, stats = avex_step(net, thinker, emb, rows, cfg, 0.3, torch.Generator().manual_seed(0))
    loss.backward()
    assert stats["gain"] == 0 and float(net.proj.weight.grad.abs().sum()) == 0



def test_avex_training_starts_from_the_set_inference_keeps(thinker, emb, monkeypatch):
    """The exchanges are rewarded against the policy's inference selection, so train and serve agree."""
    import pipelines.train_pruner as tp

    torch.manual_seed(1)
    prefill, _ = _prune_with_random_policy(AvexPruner, thinker, emb)
    torch.manual_seed(1)  # the same untrained policy again
    net = PolicyNet(_text_config(thinker).hidden_size)
    seen = []
    monkeypatch.setattr(tp, "greedy_captions", lambda th, e, keep, n: seen.append(keep) or [""] * len(keep))
    avex_step(net, thinker, emb, _rows(thinker, emb), PrunerTrainConfig(), 0.25, torch.Generator().manual_seed(0))
    s = emb.state
    for b in range(2):
        baseline = {int(i) for i in seen[0][b] if int(s.modality[b, i]) in (VIDEO, AUDIO)}
        assert baseline == _kept_media(emb, prefill, b)

def test_clause_f1():
    assert clause_f1("a low tone plays. a red star moves up.", "a red star moves up. a low tone plays.") == 1.0
    assert clause_f1("a low tone plays.", "a low tone plays. a red star moves up.") == pytest.approx(2 / 3)
    assert clause_f1("", "a low tone plays.") == 0.0


def test_sync_rope_layout(thinker):
    from operators.models.rope import SyncRotaryEmbedding, sync_section

    base = thinker.decoder.rotary_emb
    pairs = base.inv_freq.numel()
    section = sync_section(pairs)
    assert sum(section) == pairs and len(section) == 4 and section[3] >= 1
    sync = SyncRotaryEmbedding(base, section)
    x = torch.zeros(1, 1, 4)
    # Text tokens (T = H = W): identical to TMRoPE, so the layout only matters for media tokens.
    text_pos = torch.arange(10).view(1, 1, -1).expand(3, 1, -1)
    torch.testing.assert_close(sync(x, text_pos)[0], base(x, text_pos)[0])
    # Time only: the lowest-frequency channels rotate with T under Sync-RoPE, not under TMRoPE.
    pos = torch.zeros(3, 1, 2, dtype=torch.long)
    pos[0, 0, 1] = 50
    low = slice(pairs - section[3], pairs)
    assert not torch.allclose(sync(x, pos)[0][0, 1, low], sync(x, pos)[0][0, 0, low])
    torch.testing.assert_close(base(x, pos)[0][0, 1, low], base(x, pos)[0][0, 0, low])


def test_sync_rope_travels_with_the_checkpoint(thinker, tmp_path):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from operators.models.rope import SyncRotaryEmbedding, install_sync_rope

    model = Qwen2_5OmniThinkerForConditionalGeneration(copy.deepcopy(thinker.model.config))
    section = install_sync_rope(model)
    model.save_pretrained(tmp_path)
    thinker.processor.save_pretrained(tmp_path)
    loaded = OmniThinker(str(tmp_path))
    assert isinstance(loaded.decoder.rotary_emb, SyncRotaryEmbedding)
    assert loaded.decoder.rotary_emb.section == section


def test_a_sync_rope_model_prefills_and_generates_as_transformers_does(thinker):
    """Our decoder with Sync-RoPE installed equals transformers' own forward and generate of the same model
    (whose language model then calls the same rotary module), and differs from the TMRoPE model."""
    from tests.test_decoder import _hf_inputs

    from operators.models.rope import install_sync_rope

    sync = copy.deepcopy(thinker.model)
    install_sync_rope(sync)
    synced = OmniThinker.from_loaded(sync, thinker.processor, "cpu")
    sample = make_sample(thinker.processor, 43)
    inputs = dict(_hf_inputs(sample), use_audio_in_video=True)

    def last_logits(t):
        return t.decoder.prefill(t.embed(t.collate([sample])).state).logits[0]  # the last position's

    with torch.no_grad():
        reference = sync(**inputs).logits[0, -1]
    torch.testing.assert_close(last_logits(synced), reference.float(), atol=1e-4, rtol=1e-4)
    assert (last_logits(synced) - last_logits(thinker)).abs().max() > 1e-3  # Sync-RoPE changes the computation
    out = sync.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected = thinker.processor.tokenizer.decode(out[0, sample["input_ids"].shape[1]:], skip_special_tokens=True)
    assert synced.caption([sample], max_new_tokens=8)[0]["caption"] == expected.strip()


@pytest.mark.parametrize("method", ["avex", "echoingpixels"])
def test_weights_are_tied_to_the_captioner_version_they_were_trained_for(method, tmp_path):
    """The shipped weights record the shipped captioner's fingerprint; weights made for another version are
    refused with the retrain command, unless explicitly allowed (and then every row says so)."""
    from operators.caption import CaptionSettings, Captioner
    from operators.models.fingerprint import model_version
    from operators.pruning.learned import weights_model_version

    source = resolve_model_source("embedded")
    version = model_version(source)
    shipped = make_pruner(method, 0.4, model_source=source, model_version=version)
    assert shipped.weights_version == version == weights_model_version(default_weights(source, method))
    net = load_net(default_weights(source, method), OmniThinker(None).model.config.get_text_config())
    foreign = tmp_path / f"{method}.safetensors"
    save_net(net, foreign, {}, model_version="0123456789ab")
    with pytest.raises(PrunerWeightsError, match=rf"model version 0123456789ab.*train_pruner --method {method}"):
        make_pruner(method, 0.4, weights=str(foreign), model_source=source, model_version=version)
    unrecorded = tmp_path / "old.safetensors"
    save_net(net, unrecorded, {})
    with pytest.raises(PrunerWeightsError, match="unrecorded model version"):
        make_pruner(method, 0.4, weights=str(unrecorded), model_source=source, model_version=version)
    settings = CaptionSettings(model=source, device="cpu", max_new_tokens=2, pruner=method, retention=0.4,
                               pruner_weights=str(foreign), model_version=version, allow_foreign_pruner_weights=True)
    rows = Captioner(settings).caption_rows([{"clip_id": "c", "status": "error", "error": "x"}])
    assert rows[0]["pruner_weights_version"] == "0123456789ab"


def test_a_job_with_foreign_pruner_weights_stops_before_starting(tmp_path):
    from conftest import job_config
    from operators.pruning.learned import PrunerWeightsError
    from pipelines.caption import run

    source = resolve_model_source("embedded")
    net = load_net(default_weights(source, "avex"), OmniThinker(None).model.config.get_text_config())
    save_net(net, tmp_path / "avex.safetensors", {}, model_version="0123456789ab")
    with pytest.raises(PrunerWeightsError, match="retrain them"):
        run(job_config(str(tmp_path), str(tmp_path / "out"), pruner="avex",
                       pruner_weights=str(tmp_path / "avex.safetensors")))
