"""Qwen3-Omni through the one adapter, on a tiny random checkpoint of the real architecture
(`avsieve build-test-model --family qwen3-omni`): transformers' own forward, generate and get_rope_index
are the reference; every pruning method runs on its MoE decoder; the caption job runs on it (HF engine).
The vLLM engine does not run Qwen3-Omni yet (issue 31, part 3): it refuses it before the job starts."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from conftest import job_config
from operators.models.decoder import TEXT, VIDEO
from operators.models.qwen2_5_omni import OmniThinker
from operators.pruning import METHODS, make_pruner
from operators.schema import OUTPUT_SCHEMA
from operators.pruning.flops import is_moe_layer, layer_flops, prefill_flops
from pipelines.build_test_model import build
from tests.model_samples import make_sample
# The same checks against transformers as for Qwen2.5-Omni, collected here with this module's fixtures
# (the tiny Qwen3-Omni thinker and its samples).
from test_decoder import _audio_in_video, _hf_inputs, test_greedy_caption_matches_hf_generate, test_prefill_logits_match_hf_forward  # noqa: F401

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build("qwen3-omni", tmp_path_factory.mktemp("qwen3-omni") / "model"))


@pytest.fixture(scope="module")
def thinker(model_dir):
    return OmniThinker(model_dir)


@pytest.fixture(scope="module")
def samples(thinker):
    p = thinker.processor
    return [make_sample(p, 1), make_sample(p, 2, frames=12, seconds=6.0),
            make_sample(p, 3, frames=6, seconds=3.0, audio=None), make_sample(p, 4, seconds=3.0, video=None)]


def _pruner(method, retention, model_dir, budget="fixed"):
    return make_pruner(method, retention, budget, model_source=model_dir, num_layers=4)


def test_checkpoint_is_the_real_architecture(thinker, samples):
    from transformers import Qwen3OmniMoeProcessor, Qwen3OmniMoeThinkerForConditionalGeneration

    assert isinstance(thinker.model, Qwen3OmniMoeThinkerForConditionalGeneration)
    assert isinstance(thinker.processor, Qwen3OmniMoeProcessor)
    cfg = thinker.model.config.get_text_config()
    assert [is_moe_layer(cfg, i) for i in range(cfg.num_hidden_layers)] == [False, True, True, True]
    ids = samples[0]["input_ids"][0]
    # audio-in-video: <vision_start><audio_start> video/audio interleaved <audio_end><vision_end>
    start = int((ids == thinker.model.config.vision_start_token_id).nonzero()[0])
    assert int(ids[start + 1]) == thinker.model.config.audio_start_token_id


def test_positions_are_transformers_get_rope_index(thinker, samples):
    batch = thinker.collate(samples)
    emb = thinker.embed(batch)
    for b, sample in enumerate(samples):
        ref, _ = thinker.model.get_rope_index(
            sample["input_ids"], video_grid_thw=sample.get("video_grid_thw"),
            attention_mask=torch.ones_like(sample["input_ids"]), use_audio_in_video=_audio_in_video(sample),
            audio_seqlens=sample["feature_attention_mask"].sum(-1) if "input_features" in sample else None,
            second_per_grids=sample.get("video_second_per_grid"))
        valid = emb.state.valid[b]
        assert torch.equal(emb.state.position_ids[:, b][:, valid], ref[:, 0])


def test_pre_llm_pruning_equals_forward_on_kept_tokens_with_original_positions(thinker, samples):
    """Pruned prefill + cached decoding == transformers' text model (DeepStack included) run without a cache
    over the kept tokens at their original positions."""
    emb = thinker.embed(thinker.collate(samples[:2]))
    pre = thinker.decoder.prefill(emb.state, hook=make_pruner("random", 0.3), extras=emb.extras)
    tokens = thinker.decoder.decode(pre, 5, eos_token_ids=[])
    lm = thinker.model.model.language_model
    for b in range(2):
        src = pre.final_state.source_index[b]
        src = src[src >= 0]
        idx = src + emb.state.valid.shape[1] - int(emb.state.valid[b].sum())
        embeds = emb.state.hidden[b:b + 1, idx]
        pos = emb.state.position_ids[:, b:b + 1, idx]
        assert torch.equal(pre.final_state.position_ids[:, b, -len(src):], pos[:, 0])
        assert int((pre.final_state.modality[b] == TEXT).sum()) == int((emb.state.modality[b] == TEXT).sum())
        video = emb.state.modality[b:b + 1, idx] == VIDEO
        deepstack = [level[b][idx][video[0]] for level in emb.state.deepstack]
        next_pos = float(emb.state.position_ids[:, b][:, emb.state.valid[b]].max()) + 1
        for step, token in enumerate(tokens[b]):
            with torch.no_grad():
                out = lm(inputs_embeds=embeds, position_ids=pos, visual_pos_masks=video,
                         deepstack_visual_embeds=deepstack)
                logits = thinker.model.lm_head(out.last_hidden_state[:, -1])
            assert int(logits.argmax()) == token, f"sample {b} step {step}"
            embeds = torch.cat([embeds, lm.embed_tokens(torch.tensor([[token]]))], dim=1)
            pos = torch.cat([pos, torch.full((3, 1, 1), next_pos + step)], dim=2)
            video = torch.cat([video, torch.zeros(1, 1, dtype=torch.bool)], dim=1)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_every_method_keeps_text_and_original_positions(thinker, samples, model_dir, method):
    emb = thinker.embed(thinker.collate(samples))
    pre = thinker.decoder.prefill(emb.state, hook=_pruner(method, 0.3, model_dir), extras=emb.extras)
    st, fin = emb.state, pre.final_state
    for b in range(len(samples)):
        src = fin.source_index[b][fin.valid[b]]
        offset = st.valid.shape[1] - int(st.valid[b].sum())
        assert torch.equal(fin.position_ids[:, b][:, fin.valid[b]], st.position_ids[:, b, src + offset])
        assert torch.equal(fin.deepstack[:, b][:, fin.valid[b]], st.deepstack[:, b, src + offset])
        text = (st.modality[b] == TEXT).nonzero().flatten() - offset
        assert set(text.tolist()) <= set(src.tolist())
        n_media = int(((st.modality[b] != TEXT) & st.valid[b]).sum())
        assert int(((fin.modality[b] != TEXT) & fin.valid[b]).sum()) < n_media, method


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_retention_one_reproduces_unpruned(thinker, samples, model_dir, method):
    emb = thinker.embed(thinker.collate(samples))
    base = thinker.decoder.prefill(emb.state).logits
    pruned = thinker.decoder.prefill(emb.state, hook=_pruner(method, 1.0, model_dir), extras=emb.extras).logits
    torch.testing.assert_close(pruned, base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_pruned_batch_equals_one_by_one(thinker, samples, model_dir, method):
    batched = thinker.caption(samples, 5, hook=_pruner(method, 0.3, model_dir, "adaptive"))
    for b, s in enumerate(samples):
        single = thinker.caption([s], 5, hook=_pruner(method, 0.3, model_dir, "adaptive"))[0]
        for key in ("caption", "video_tokens_kept", "audio_tokens_kept", "kept_media"):
            assert batched[b][key] == single[key], (method, b, key)


def test_fastv_scores_are_the_models_own_attention(model_dir, samples):
    """The last query's head-averaged attention (q_norm, interleaved TM-RoPE) equals transformers' eager
    attention weights of the same layer."""
    thinker = OmniThinker(model_dir, attn_implementation="eager")
    sample = samples[0]
    seen = {}

    class Probe:
        def layers(self, num_layers):
            return [2]

        def select(self, ctx):
            seen["scores"] = ctx.last_query_scores()
            return None

    emb = thinker.embed(thinker.collate([sample]))
    thinker.decoder.prefill(emb.state, hook=Probe(), extras=emb.extras)
    with torch.no_grad():
        out = thinker.model(**_hf_inputs(sample), use_audio_in_video=True, output_attentions=True)
    ref = out.attentions[1][:, :, -1].float().mean(1)
    torch.testing.assert_close(seen["scores"], ref, atol=1e-5, rtol=1e-4)


def test_moe_flops_count_active_experts_only(thinker):
    cfg = thinker.model.config.get_text_config()
    d, n = cfg.hidden_size, 100
    dense, moe = layer_flops(n, cfg, 0), layer_flops(n, cfg, 1)
    # A MoE layer: the router plus num_experts_per_tok experts of moe_intermediate_size, not all of them.
    expected = 2 * n * d * cfg.num_experts + 2 * n * d * cfg.moe_intermediate_size * 3 * cfg.num_experts_per_tok
    assert moe - dense == pytest.approx(expected - 2 * n * d * cfg.intermediate_size * 3)
    # The sieve's extra layer counts as the layer it copies (layer 0: dense).
    assert prefill_flops([n] * 5, cfg) - prefill_flops([n] * 4, cfg) == pytest.approx(dense)


def test_caption_job_on_qwen3_omni(ray_cluster, real_clips, model_dir, tmp_path):
    from pipelines import caption as caption_job

    summary = caption_job.run(job_config(str(real_clips), str(tmp_path / "out"), model=model_dir, engine="hf",
                                         pruner="echoingpixels", retention=0.4, batch_size=2))
    rows = pq.read_table(tmp_path / "out", schema=OUTPUT_SCHEMA).to_pylist()
    assert summary["ok"] == len(rows) == 3
    for r in rows:
        assert r["status"] == "ok" and r["video_tokens"] > 0 and r["audio_tokens"] > 0
        kept = r["video_tokens_kept"] + r["audio_tokens_kept"]
        assert kept == round(0.4 * (r["video_tokens"] + r["audio_tokens"]))


def test_the_vllm_engine_takes_qwen3_omni_and_refuses_what_it_cannot_run(model_dir):
    """At 2 or 1 frames per second a Qwen3-Omni --model runs on vLLM, unpruned or with a pre-LLM method
    (tests/test_vllm_qwen3.py); in-decoder methods and frame rates whose time positions are fractional are
    named before the job (so --engine vllm fails pointing at hf, and auto picks hf even with a GPU)."""
    from operators.engines import resolve_engine
    from operators.engines.vllm import unsupported_options
    from pipelines.config import CaptionConfig

    def problems(**changes):
        return unsupported_options(CaptionConfig(input="in", output="out", engine="vllm", model=model_dir, **changes))

    assert problems() == [] and problems(fps=1.0) == [] and problems(pruner="avex", retention=0.4) == []
    for changes, named in (({"pruner": "fastv", "retention": 0.4}, "--pruner fastv"), ({"fps": 3.0}, "--fps 3.0")):
        found = problems(**changes)
        assert len(found) == 1 and named in found[0]
        assert resolve_engine("auto", found, gpu=True) == "hf"
        with pytest.raises(ValueError, match="--engine hf"):
            resolve_engine("vllm", found, gpu=True)
    assert unsupported_options(CaptionConfig(input="in", output="out", engine="vllm")) == []  # the embedded model
