"""Pruning methods and budgets on the real thinker class (embedded model, random weights are enough)."""

import math

import pytest
import torch

from operators.models.decoder import AUDIO, TEXT, VIDEO
from operators.models.qwen2_5_omni import OmniThinker, resolve_model_source
from operators.pruning import METHODS, PRUNERS
from operators.pruning import make_pruner as _make_pruner
from operators.pruning.attention import FastAVPruner, fastav_schedule, single_stage_fraction
from operators.pruning.budget import AdaptiveBudget, audio_floor
from operators.pruning.content import sample_signals
from operators.pruning.flops import prefill_flops
from tests.model_samples import make_sample


def make_pruner(*args, **kwargs):
    """Trained methods (echoingpixels, avex) use the weights shipped with the embedded model."""
    return _make_pruner(*args, model_source=resolve_model_source("embedded"), **kwargs)


@pytest.fixture(scope="module")
def thinker():
    return OmniThinker(None)


@pytest.fixture(scope="module")
def samples(thinker):
    p = thinker.processor
    return [make_sample(p, 11), make_sample(p, 12, frames=12, seconds=6.0),
            make_sample(p, 13, frames=6, seconds=3.0, audio=None), make_sample(p, 14, seconds=3.0, video=None)]


def _prefill(thinker, samples, hook):
    emb = thinker.embed(thinker.collate(samples))
    return emb, thinker.decoder.prefill(emb.state, hook=hook, extras=emb.extras)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
@pytest.mark.parametrize("budget", ["fixed", "adaptive"])
def test_retention_one_reproduces_unpruned(thinker, samples, method, budget):
    _, base = _prefill(thinker, samples, None)
    _, pruned = _prefill(thinker, samples, make_pruner(method, 1.0, budget))
    torch.testing.assert_close(pruned.logits, base.logits, atol=1e-5, rtol=1e-5)
    assert [r["caption"] for r in thinker.caption(samples, 6, hook=make_pruner(method, 1.0, budget))] == \
        [r["caption"] for r in thinker.caption(samples, 6)]


@pytest.mark.parametrize("method", ["random", "uniform", "echoingpixels", "avex"])
@pytest.mark.parametrize("retention", [0.6, 0.2])
def test_pre_llm_kept_counts_match_budget(thinker, samples, method, retention):
    results = thinker.caption(samples, 2, hook=make_pruner(method, retention))
    for r in results:
        n = r["video_tokens"] + r["audio_tokens"]
        assert r["video_tokens_kept"] + r["audio_tokens_kept"] == round(retention * n)


def test_in_llm_methods_meet_compute_budget_when_feasible(thinker, samples):
    layers = thinker.model.config.get_text_config().num_hidden_layers  # 4 in the embedded model
    retention = 0.6  # feasible for pruning after layer 1 (fastv) and at layer 2 (fastav)
    for method in ("fastv", "fastav"):
        emb, pre = _prefill(thinker, samples, make_pruner(method, retention))
        for b in range(len(samples)):
            per_layer = [int(k[b, 1] + k[b, 2]) for k in pre.kept_per_layer]
            n = per_layer[0]
            assert abs(sum(per_layer) / (layers * n) - retention) < 0.03, (method, per_layer)
            assert per_layer == sorted(per_layer, reverse=True)  # tokens only ever leave


def test_text_kept_and_positions_original(thinker, samples):
    for method in ("random", "uniform", "fastv", "fastav", "echoingpixels", "avex"):
        emb, pre = _prefill(thinker, samples, make_pruner(method, 0.3))
        st, fin = emb.state, pre.final_state
        for b in range(len(samples)):
            src = fin.source_index[b][fin.valid[b]]
            offset = st.valid.shape[1] - int(st.valid[b].sum())
            assert torch.equal(fin.position_ids[:, b][:, fin.valid[b]], st.position_ids[:, b, src + offset])
            assert torch.equal(fin.modality[b][fin.valid[b]], st.modality[b, src + offset])
            text = (st.modality[b] == TEXT).nonzero().flatten() - offset
            assert set(text.tolist()) <= set(src.tolist()), method
            assert src.tolist() == sorted(src.tolist())  # order preserved


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_pruned_batch_equals_one_by_one(thinker, samples, method):
    batched = thinker.caption(samples, 6, hook=make_pruner(method, 0.3, "adaptive"))
    for b, s in enumerate(samples):
        single = thinker.caption([s], 6, hook=make_pruner(method, 0.3, "adaptive"))[0]
        for key in ("caption", "video_tokens_kept", "audio_tokens_kept"):
            assert batched[b][key] == single[key], (method, b, key)


def test_adaptive_silent_audio_and_static_video(thinker):
    p = thinker.processor
    busy = make_sample(p, 21, frames=12, seconds=6.0)
    static_silent = make_sample(p, 22, frames=12, seconds=6.0, audio="silent", video="static")
    for method in ("random", "uniform"):
        out = thinker.caption([busy, static_silent], 2, hook=make_pruner(method, 0.4, "adaptive"))
        floor = audio_floor(out[1]["audio_tokens"])
        assert 2 <= floor < out[1]["audio_tokens"] * 0.1  # a trace of the silence, no more
        assert out[1]["audio_tokens_kept"] == floor
        assert out[1]["video_tokens_kept"] < out[0]["video_tokens_kept"]
        assert out[0]["audio_tokens_kept"] > 5 * floor


def test_adaptive_budget_does_not_cap_sound_alone(thinker):
    """The audio cap moves a quiet window's budget to its picture; a window of sound alone has no picture, so
    its plan keeps what its retention asks, quiet or not (an audio-visual window keeps only the floor)."""
    p = thinker.processor
    quiet_av = make_sample(p, 31, seconds=6.0, audio="silent")
    quiet_sound = make_sample(p, 31, seconds=6.0, audio="silent", video=None)
    budget = AdaptiveBudget(0.4, c_ref=0.02)  # a low reference level: even silence gets a share above the floor
    av_plan, sound_plan = budget.plan(*sample_signals(quiet_av)), budget.plan(*sample_signals(quiet_sound))
    n_audio = int(sample_signals(quiet_sound)[1].numel())
    assert av_plan.audio_cap == audio_floor(n_audio) < sound_plan.audio_cap == n_audio
    for method in ("random", "uniform", "echoingpixels", "avex"):
        hook = make_pruner(method, 0.4, "adaptive", c_ref=0.02)
        av_row, sound_row = thinker.caption([quiet_av, quiet_sound], 2, hook=hook)
        assert av_row["audio_tokens_kept"] == audio_floor(n_audio)
        assert sound_row["video_tokens"] == 0
        assert sound_row["audio_tokens_kept"] == sound_plan.joint_keep(0, n_audio) > audio_floor(n_audio)


def test_adaptive_calibration_meets_mean_retention(thinker):
    p = thinker.processor
    kinds = [("noise", "noise"), ("silent", "static"), ("noise", "static"), ("silent", "noise"), (None, "noise")]
    windows = [make_sample(p, 30 + i, frames=8 + 2 * (i % 3), seconds=4.0 + i % 3, audio=a, video=v)
               for i, (a, v) in enumerate(kinds * 2)]
    signals = [sample_signals(w) for w in windows]
    for target in (0.6, 0.4, 0.2):
        budget = AdaptiveBudget(target)
        budget.calibrate(signals)
        results = thinker.caption(windows, 1, hook=make_pruner("uniform", target, "adaptive", budget.c_ref))
        kept = sum(r["video_tokens_kept"] + r["audio_tokens_kept"] for r in results)
        total = sum(r["video_tokens"] + r["audio_tokens"] for r in results)
        assert abs(kept / total - target) <= 0.02, (target, kept / total)
        per_window = {round((r["video_tokens_kept"] + r["audio_tokens_kept"]) /
                            (r["video_tokens"] + r["audio_tokens"]), 2) for r in results}
        assert len(per_window) > 2  # budgets really differ between windows


@pytest.mark.parametrize("retention", [0.9, 0.557, 0.3, 0.2])
def test_fastav_schedule_mean_equals_retention(retention):
    L = 28
    K, g, P = fastav_schedule(retention, L, L // 2)
    mean = (K + g * sum((1 - P) ** j for j in range(L - K))) / L
    assert abs(mean - retention) < 1e-6
    assert K <= L // 2 and 0 < g <= 1 and 0 <= P <= 0.2
    assert fastav_schedule(1.0, L, L // 2) is None


def test_fastav_paper_default_flops_under_sixty_percent():
    from transformers import Qwen2_5OmniTextConfig

    cfg = Qwen2_5OmniTextConfig()  # 7B: 28 layers, width 3584
    K, g, P = fastav_schedule(FastAVPruner.paper_retention(28), 28, 14)
    n_av, n_text, counts, cur = 2000, 40, [], 2000
    for layer in range(28):
        cur = round(g * n_av) if layer == K else (math.ceil(cur * (1 - P)) if layer > K else cur)
        counts.append(cur + n_text)
    ratio = prefill_flops(counts, cfg) / prefill_flops([n_av + n_text] * 28, cfg)
    assert 0.5 < ratio <= 0.60


def test_single_stage_fraction_compute_equivalence():
    assert single_stage_fraction(1.0, 28, 2) == 1.0
    f = single_stage_fraction(0.5, 28, 2)
    assert abs((2 + 26 * f) / 28 - 0.5) < 1e-9


def test_registry_rejects_unknown():
    with pytest.raises(ValueError, match="unknown pruner"):
        make_pruner("nope", 0.5)
    assert set(PRUNERS) | {"none"} == set(METHODS)


def _timed_state(video_t, audio_t, n_text=3):
    """One sample: text, then video tokens at the given temporal ids, then audio tokens."""
    from operators.models.decoder import TokenState

    t = torch.tensor([0] * n_text + list(video_t) + list(audio_t))
    modality = torch.tensor([TEXT] * n_text + [VIDEO] * len(video_t) + [AUDIO] * len(audio_t), dtype=torch.int8)
    n = t.numel()
    return TokenState(torch.zeros(1, n, 4), t.view(1, 1, n).expand(3, 1, n).clone(), torch.ones(1, n, dtype=torch.bool),
                      modality[None], torch.arange(n)[None])


def test_select_stratified_takes_the_best_token_of_each_stretch_in_time_order():
    from operators.models.decoder import PruneContext
    from operators.pruning.base import select_stratified

    video_t = [25 * s for s in range(4) for _ in range(6)]  # 4 s x 6 tokens
    audio_t = list(range(100))[::-1]  # 4 s x 25 tokens, stored latest first: strata follow time, not storage
    state = _timed_state(video_t, audio_t)
    ctx = PruneContext(0, 6, state, None, None, lambda: None, {"position_ids_per_second": 25})
    scores = torch.rand(state.valid.shape[1], generator=torch.Generator().manual_seed(0))
    scores[3:9] += 10  # second 0 of the video scores far above the rest: a plain top-k would take only it
    keep = select_stratified(ctx, 0, scores, k_video=8, k_audio=10)
    kept = set(keep.tolist())
    assert set(range(3)) <= kept and len(kept) == 3 + 8 + 10
    for code, k, times in ((VIDEO, 8, video_t), (AUDIO, 10, audio_t)):
        idx = [int(i) for i in torch.nonzero(state.modality[0] == code).flatten()]
        by_time = [i for _, i in sorted(zip(times, idx))]  # video: ties keep storage order (h, w are equal)
        sizes = [len(by_time) // k + (j < len(by_time) % k) for j in range(k)]
        starts = [sum(sizes[:j]) for j in range(k)]
        for a, n in zip(starts, sizes):
            stretch = by_time[a:a + n]
            assert kept & set(stretch) == {max(stretch, key=lambda i: float(scores[i]))}


def test_joint_split_follows_the_joint_top_k_within_the_floor():
    from operators.models.decoder import PruneContext
    from operators.pruning.base import joint_split
    from operators.pruning.budget import WindowBudget

    state = _timed_state([0] * 40, list(range(60)))
    ctx = PruneContext(0, 6, state, None, None, lambda: None, {})
    plan = WindowBudget(0.2, 40, 60)  # keep 20: 8 video, 12 audio in proportion
    video = state.modality[0] == VIDEO
    # Video scores spread over 0..1.2 (ends at token 42 of 103) and audio sits at 1.01: the joint top-k takes
    # its 20 from both, as it likes.
    mixed = torch.where(video, torch.linspace(0, 3, state.valid.shape[1]), torch.tensor(1.01))
    top = torch.topk(mixed[3:], 20).indices + 3
    k_video = int(video[top].sum())
    assert 0 < k_video < 20 and joint_split(ctx, 0, mixed, plan, floor=0.5) == (k_video, 20 - k_video)
    all_audio = torch.where(video, 0.0, 1.0)
    assert joint_split(ctx, 0, all_audio, plan, floor=0.5) == (4, 16)  # video held to half its share of 8
    assert joint_split(ctx, 0, 1 - all_audio, plan, floor=0.75) == (11, 9)  # audio to int(0.75 * 12)


def test_audio_floor_is_kept_whatever_the_scores():
    """The adaptive budget's audio floor holds under a joint ranking and a proportional split alike."""
    from operators.models.decoder import PruneContext
    from operators.pruning.base import modality_split, select_joint
    from operators.pruning.budget import WindowBudget

    state = _timed_state([0] * 40, list(range(60)))
    ctx = PruneContext(0, 6, state, None, None, lambda: None, {})
    audio = state.modality[0] == AUDIO
    video_first = torch.where(audio, torch.arange(state.valid.shape[1]) * 1e-3, torch.tensor(1.0))
    plan = WindowBudget(0.1, 40, 60, audio_min=5)  # keep 10 of 100, video scored above every audio token
    kept = select_joint(ctx, 0, video_first, plan.joint_keep(40, 60), plan)
    kept_audio = kept[audio[kept]]
    assert len(kept_audio) == 5 and (state.modality[0][kept] == VIDEO).sum() == 5
    assert set(kept_audio.tolist()) == set(torch.nonzero(audio).flatten()[-5:].tolist())  # the best five
    no_floor = select_joint(ctx, 0, video_first, 10, WindowBudget(0.1, 40, 60))
    assert not audio[no_floor].any()  # without the floor the same scores keep no audio at all
    # Silent audio capped at its floor: a proportional split would give it 1 of 10; the floor gives 5.
    assert modality_split(WindowBudget(0.1, 40, 5, audio_min=5), 40, 60) == (5, 5)
    assert modality_split(WindowBudget(0.1, 40, 5), 40, 60) == (9, 1)
    # Never more than half the keep: a tight budget on a silent clip still shows the picture.
    assert modality_split(WindowBudget(0.04, 40, 8, audio_min=8), 40, 60) == (2, 2)
    tight = select_joint(ctx, 0, video_first, 4, WindowBudget(0.04, 40, 60, audio_min=8))
    assert int(audio[tight].sum()) == 2


@pytest.mark.parametrize("method", ["random", "uniform"])
def test_a_binding_audio_cap_prunes_at_retention_one(method):
    """An adaptive window at the ceiling (retention 1.0) whose audio cap binds keeps only the capped audio,
    with random as with every other method (random used to keep everything, running above its budget)."""
    from operators.models.decoder import PruneContext
    from operators.pruning.budget import WindowBudget

    state = _timed_state([25 * (i // 10) for i in range(40)], list(range(60)))
    plan = WindowBudget(1.0, 40, 10, audio_min=5)
    ctx = PruneContext(0, 6, state, None, None, lambda: None,
                       {"plans": [plan], "seeds": [7], "position_ids_per_second": 25})
    (keep,) = PRUNERS[method](None).select(ctx)
    kept = state.modality[0][keep]
    assert int((kept == VIDEO).sum()) == 40 and int((kept == AUDIO).sum()) == 10 and int((kept == TEXT).sum()) == 3


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
@pytest.mark.parametrize("retention", [0.2, 0.4, 0.6])
def test_adaptive_runs_meet_the_target_on_each_methods_own_compute(thinker, method, retention):
    """Calibrated on a sample's content signals with the method's own compute share, a run of the same
    windows keeps, averaged over layers as the rows report it, the target within 0.02 (FastV and FastAV
    run every token through their first layers: a pre-LLM calibration overshot them)."""
    from operators.pruning import calibrated_c_ref

    p = thinker.processor
    windows = [make_sample(p, 100 + i, frames=4 + 2 * (i % 4), seconds=2.0 + i % 3,
                           audio=("noise", "silent", None)[i % 3], video=("noise", "static")[i % 2])
               for i in range(10)]
    layers = thinker.model.config.get_text_config().num_hidden_layers
    c_ref = calibrated_c_ref(method, retention, [sample_signals(w) for w in windows], layers,
                             model_source=resolve_model_source("embedded"))
    rows = thinker.caption(windows, 1, hook=make_pruner(method, retention, "adaptive", c_ref, num_layers=layers))
    kept = sum(r["video_tokens_kept"] + r["audio_tokens_kept"] for r in rows)
    total = sum(r["video_tokens"] + r["audio_tokens"] for r in rows)
    assert abs(kept / total - retention) <= 0.02, kept / total


def test_fastv_scores_are_the_models_own_attention_and_it_keeps_their_top():
    """The last-query score row that FastV and FastAV read equals the head-averaged attention probabilities
    of the last prompt token in transformers' own eager forward, at the layer before the cut; FastV keeps
    the audio/video tokens that row ranks highest."""
    from operators.pruning.attention import FastVPruner, single_stage_fraction
    from operators.pruning.budget import FixedBudget
    from tests.test_decoder import _hf_inputs

    thinker = OmniThinker(None, attn_implementation="eager")
    sample = make_sample(thinker.processor, 21)
    layers = thinker.model.config.get_text_config().num_hidden_layers
    with torch.no_grad():
        out = thinker.model(**_hf_inputs(sample), use_audio_in_video=True, output_attentions=True)
    retention = 0.5
    fastv = FastVPruner(FixedBudget(retention))
    k = fastv.prune_layer(layers)
    seen = {}
    select = fastv.select

    def spy(ctx):
        seen["scores"] = ctx.last_query_scores()[0].clone()
        keep = select(ctx)
        seen["kept"] = ctx.state.source_index[0, keep[0]].tolist()  # indices into the prompt
        return keep

    fastv.select = spy
    emb = thinker.embed(thinker.collate([sample]))
    thinker.decoder.prefill(emb.state, hook=fastv, extras=emb.extras)
    reference = out.attentions[k - 1][0, :, -1].mean(0).float()  # heads averaged, last query, layer K-1
    torch.testing.assert_close(seen["scores"], reference, atol=1e-5, rtol=1e-4)
    media = torch.nonzero((emb.state.modality[0] == VIDEO) | (emb.state.modality[0] == AUDIO)).flatten()
    n_keep = round(single_stage_fraction(retention, layers, k) * media.numel())
    top = media[torch.topk(reference[media], n_keep).indices]
    assert set(seen["kept"]) & set(media.tolist()) == set(top.tolist())
