"""The vLLM engine on a Qwen3-Omni thinker (the tiny random one of the real architecture) against
transformers and the HF engine: positions, token ids, float32 greedy captions, pruning inside vLLM,
refusals, the job.

Runs where vLLM is installed (.venv-vllm) and is skipped in the main .venv.
"""

from __future__ import annotations

import dataclasses

import pyarrow.parquet as pq
import pytest
import torch

from conftest import float32_hf, float32_vllm, job_config, vllm_or_skip
from operators import tokenize as tok
from operators.prepare import prepare_windows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Audio-in-video, a video without sound, sound alone (an .m4a: AAC frames end past a whole 10-ms feature
# frame), three windows of one clip, and 1 frame per second (2 s a temporal grid step).
CASES = {"av": {}, "video_only": {}, "sound": {}, "long": {}, "long@1fps": {"fps": 1.0, "window_s": 10.0}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from pipelines.build_test_model import build

    return str(build("qwen3-omni", tmp_path_factory.mktemp("qwen3-omni") / "model"))


@pytest.fixture(scope="module")
def settings(model_dir):
    from operators.models.qwen3_omni import TINY_PREPROCESS
    from operators.prepare import PrepareSettings

    return PrepareSettings(model=model_dir, prompt="Describe the clip.", window_s=4.0,
                           max_pixels=TINY_PREPROCESS["max_pixels"], min_pixels=TINY_PREPROCESS["min_pixels"])


@pytest.fixture(scope="module")
def vllm_qwen3(model_dir):
    return float32_vllm(model_dir)


@pytest.fixture(scope="module")
def hf_qwen3(model_dir):
    return float32_hf(model_dir)


def _windows(uri: str, settings, form: str) -> list[bytes]:
    base = {"source_id": uri, "clip_id": None, "uri": uri, "start_s": None, "end_s": None, "prompt": None}
    rows = list(prepare_windows(base, dataclasses.replace(settings, window_form=form)))
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    return [r["model_inputs"] for r in rows]


@pytest.fixture(scope="module")
def case_windows(clip_set, settings):
    """{case#window: (hf blob, vllm blob)}."""
    out = {}
    for case, changes in CASES.items():
        case_settings = dataclasses.replace(settings, **changes)
        uri = str(clip_set[case.split("@")[0]])
        pairs = zip(_windows(uri, case_settings, "tensors"), _windows(uri, case_settings, "compact"))
        out.update({f"{case}#{i}": pair for i, pair in enumerate(pairs)})
    assert len(out) == 7
    return out


def test_sound_reaches_both_engines_as_whole_feature_frames(case_windows, hf_qwen3):
    """The .m4a's decoded sound (3 s plus AAC padding) is cut to whole 10-ms frames once, so the HF
    tensors and the compact window hold the same samples (vLLM's processor would pad the last frame)."""
    hop = hf_qwen3.thinker.processor.feature_extractor.hop_length
    hf_blob, vl_blob = case_windows["sound#0"]
    audio = tok.unpack_compact(vl_blob)["audio"]
    assert len(audio) % hop == 0
    assert int(tok.unpack(hf_blob)["feature_attention_mask"].sum()) == len(audio) // hop


def test_positions_equal_transformers(case_windows, vllm_qwen3, monkeypatch):
    """Every window through the real engine: the positions the model class gives vLLM equal transformers'
    Qwen3 get_rope_index on the HF processor's tensors (whole numbers at 1 and 2 frames per second)."""
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from operators.engines.vllm_model import ExactQwen3OmniThinker

    seen = {}
    ours = ExactQwen3OmniThinker.get_mrope_input_positions

    def spy(self, input_tokens, mm_features):
        seen[tuple(input_tokens)] = ours(self, input_tokens, mm_features)
        return seen[tuple(input_tokens)]

    monkeypatch.setattr(ExactQwen3OmniThinker, "get_mrope_input_positions", spy)
    vllm_qwen3.caption([vl for _, vl in case_windows.values()])
    reference_model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(vllm_qwen3.settings.model)
    for case, (hf_blob, _) in case_windows.items():
        t = tok.unpack(hf_blob)
        ids = t["input_ids"].reshape(1, -1)
        audio, grid = t.get("feature_attention_mask"), t.get("video_grid_thw")
        reference, delta = reference_model.model.get_rope_index(
            ids, None, grid, torch.ones_like(ids), use_audio_in_video=audio is not None and grid is not None,
            audio_seqlens=audio.sum(-1) if audio is not None else None,
            second_per_grids=t.get("video_second_per_grid"))
        got, got_delta = seen[tuple(ids[0].tolist())]
        assert not got.is_floating_point() and torch.equal(got, reference[:, 0].long()), case
        assert torch.equal(reference[:, 0], reference[:, 0].round()), case
        assert got_delta == int(delta), case


def test_captions_equal_the_hf_engine_in_float32_greedy(case_windows, vllm_qwen3, hf_qwen3):
    keys = sorted(case_windows)
    hf_rows = hf_qwen3.caption([case_windows[k][0] for k in keys])
    vl_rows = vllm_qwen3.caption([case_windows[k][1] for k in keys])
    for key, a, b in zip(keys, hf_rows, vl_rows):
        assert b["output_tokens"] > 0 and b["caption"] == a["caption"], key
        for field in ("text_tokens", "video_tokens", "audio_tokens", "output_tokens", "caption_truncated"):
            assert b[field] == a[field], (key, field)
        assert b["prefill_flops"] == pytest.approx(a["prefill_flops"])  # MoE: active experts only, both engines


def test_without_the_interleaved_rotary_key_video_captions_differ(case_windows, vllm_qwen3, monkeypatch):
    """What the config translation is for: vLLM reads `mrope_interleaved`, transformers always interleaves.
    The model class's own rotary, swapped for a block-wise one, changes the logits of every video window."""
    from vllm import SamplingParams

    window = tok.unpack_compact(case_windows["av#0"][1])
    request = vllm_qwen3._request(window)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    exact = vllm_qwen3.llm.generate([request], params, use_tqdm=False)[0].outputs[0].logprobs[0]
    rotary = vllm_qwen3.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model \
        .language_model.model.layers[0].self_attn.rotary_emb
    monkeypatch.setattr(rotary, "mrope_interleaved", False)
    blockwise = vllm_qwen3.llm.generate([request], params, use_tqdm=False)[0].outputs[0].logprobs[0]
    shared = set(exact) & set(blockwise)
    assert any(abs(exact[t].logprob - blockwise[t].logprob) > 1e-4 for t in shared) or set(exact) != set(blockwise)


@pytest.fixture(scope="module", params=("random", "uniform", "avex", "echoingpixels"))
def pruned_qwen3(request, model_dir):
    """One pruned vLLM engine per pre-LLM method on the tiny Qwen3-Omni thinker (its pruners/ hold untrained
    echoingpixels/avex nets of its shape), freed before the next starts."""
    import gc

    captioner = float32_vllm(model_dir, pruner=request.param, retention=0.3)
    yield captioner
    del captioner.llm
    gc.collect()


@pytest.mark.parametrize("budget", ["fixed", "adaptive"])
def test_pruned_engines_keep_the_same_tokens_with_their_deepstack_rows_and_caption_alike(
        pruned_qwen3, budget, case_windows, hf_qwen3, model_dir, monkeypatch):
    """Every pre-LLM method, both budgets: vLLM's pruned Qwen3-Omni class keeps the tokens the HF engine keeps,
    at their unpruned positions, and (DeepStack rows riding with the kept video tokens) captions alike."""
    from test_vllm_pruning import ROW_FIELDS, _expected_positions, _plan_pruner, spy_positions

    from operators.engines.vllm_pruning import PrunedQwen3OmniThinker

    keys = sorted(k for k in case_windows if "@" not in k)
    blobs = [case_windows[k][0] for k in keys]  # pruned runs of both engines take the processor's tensors
    samples = [tok.unpack(b) for b in blobs]
    method = pruned_qwen3.settings.pruner
    thinker_config = hf_qwen3.thinker.model.config
    pruner = _plan_pruner(method, budget, samples, model_dir, thinker_config.get_text_config().num_hidden_layers)
    monkeypatch.setattr(pruned_qwen3, "pruner", pruner)

    seen = spy_positions(monkeypatch, PrunedQwen3OmniThinker)
    vl_rows = pruned_qwen3.caption(blobs)
    hf_rows = hf_qwen3.thinker.caption(samples, 24, hook=pruner)
    pruned_video = 0
    for key, sample, kept, a, b in zip(keys, samples, pruned_qwen3.last_kept, hf_rows, vl_rows):
        assert kept.media.tolist() == a["kept_media"], key
        for field in ROW_FIELDS:
            assert b[field] == a[field], (key, field)
        assert b["prefill_flops"] == pytest.approx(a["prefill_flops"])
        assert b["output_tokens"] > 0 and b["caption"] == a["caption"], key
        positions, delta, prompt = _expected_positions(thinker_config, sample, a["kept_media"])
        assert any(torch.equal(got.cpu(), positions) and got_delta == delta for got, got_delta in seen[prompt]), key
        pruned_video += 0 < a["video_tokens_kept"] < a["video_tokens"]
    assert pruned_video >= 3


def test_kept_video_tokens_bring_their_own_deepstack_rows(pruned_qwen3, case_windows, hf_qwen3, monkeypatch):
    """What vLLM adds after decoder layers 0-2 at each slot is the DeepStack row of the video token kept
    there (transformers' vision tower on the same pixels), and nothing at a slot holding an audio token."""
    from operators.engines.vllm_pruning import PrunedQwen3OmniThinker

    seen = []
    original = PrunedQwen3OmniThinker._set_deepstack_input_embeds
    monkeypatch.setattr(PrunedQwen3OmniThinker, "_set_deepstack_input_embeds",
                        lambda self, rows: seen.append(rows.clone()) or original(self, rows))
    sample = tok.unpack(case_windows["av#0"][0])
    (row,) = pruned_qwen3.caption([case_windows["av#0"][0]])
    kept = pruned_qwen3.last_kept[0]
    assert 0 < row["video_tokens_kept"] < row["video_tokens"] and row["audio_tokens_kept"] > 0
    thinker = hf_qwen3.thinker.model
    with torch.no_grad():
        levels = thinker.model.get_video_features(sample["pixel_values_videos"], sample["video_grid_thw"],
                                                  return_dict=True).deepstack_features
    levels = [torch.cat(list(level)) if isinstance(level, (list, tuple)) else level for level in levels]
    ids = sample["input_ids"].reshape(-1)
    video_id = thinker.config.video_token_id
    video_rank = torch.cumsum(ids == video_id, 0) - 1  # a video token's row in the tower's output
    first_slot = int(torch.nonzero((ids == video_id) | (ids == thinker.config.audio_token_id))[0])
    (rows,) = seen[:1]  # the prefill's buffer: (levels, tokens of the prompt, width)
    assert rows.shape[0] == len(levels)
    for slot, index in enumerate(kept.media.tolist()):
        got = rows[:, first_slot + slot]
        if ids[index] == video_id:
            expected = torch.stack([level[video_rank[index]] for level in levels])
            torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-4, atol=1e-5)
        else:
            assert not got.any()


def test_fractional_time_positions_are_refused_before_the_engine(model_dir, case_windows, vllm_qwen3):
    from operators.engines.vllm import unsupported_options
    from pipelines.config import CaptionConfig

    assert unsupported_options(CaptionConfig(model=model_dir, fps=2.0)) == []
    assert unsupported_options(CaptionConfig(model=model_dir, fps=1.0)) == []
    (problem,) = unsupported_options(CaptionConfig(model=model_dir, fps=3.0))
    assert "--fps 3.0" in problem
    assert unsupported_options(CaptionConfig(model=model_dir, pruner="avex", retention=0.4)) == []
    window = tok.unpack_compact(case_windows["av#0"][1])
    three_fps = tok.pack_compact(window["input_ids"], window["frames"], 3.0, window["audio"], window["prompt_text"],
                                 window["size"])
    with pytest.raises(ValueError, match="fractional time positions"):
        vllm_qwen3.caption([three_fps])
    assert vllm_qwen3.caption([case_windows["av#0"][1]])[0]["caption"]  # the engine goes on


def test_job_on_vllm_with_a_qwen3_model(ray_cluster, clip_set, model_dir, tmp_path):
    vllm_or_skip()
    from pipelines.caption import run

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("av", "video_only", "sound"):
        (folder / clip_set[name].name).write_bytes(clip_set[name].read_bytes())
    summary = run(job_config(str(folder), str(tmp_path / "out"), engine="vllm", model=model_dir))
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert summary["engine"] == "vllm" and len(rows) == 3
    assert all(r["status"] == "ok" and r["engine"] == "vllm" and r["output_tokens"] > 0 for r in rows), rows
    assert {r["has_video"] for r in rows} == {True, False}
