"""Joint audio-visual pruning in the vLLM engine against the HF engine: the same kept tokens, positions and
float32 greedy captions for every pre-LLM method under both budgets; the job end to end.

Runs where vLLM is installed (.venv-vllm; `.ci/run` requires it there) and is skipped in the main .venv,
except the refusal of in-decoder methods, which needs no vLLM.
"""

from __future__ import annotations

import dataclasses
import gc
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import REAL_CLIPS, float32_vllm, job_config, vllm_or_skip
from operators import tokenize as tok
from operators.prepare import prepare_windows

METHODS = ("random", "uniform", "avex", "echoingpixels")
RETENTION = 0.3
ROW_FIELDS = ("text_tokens", "video_tokens", "audio_tokens", "video_tokens_kept", "audio_tokens_kept",
              "output_tokens", "caption_truncated")


@pytest.fixture(scope="module")
def windows(clip_set, real_clips, prepare_settings) -> dict[str, bytes]:
    """Processor-tensor windows (what a pruned run of either engine gets): 5 generated clips (one of sound
    alone), 3 real ones."""
    out = {}
    for name in ["av", "long", "video_only", "silent", "sound", *REAL_CLIPS]:
        uri = str(clip_set[name]) if name in clip_set else str(real_clips / name)
        base = {"source_id": name, "clip_id": None, "uri": uri, "start_s": None, "end_s": None, "prompt": None}
        for row in prepare_windows(base, prepare_settings):
            assert row["status"] == "ok", row["error"]
            out[f"{name}#{row['window_index']}"] = row["model_inputs"]
    assert len(out) == 10
    return out


@pytest.fixture(scope="module", params=METHODS)
def pruned_engine(request, model_source):
    """One pruned vLLM engine per method (float32, greedy, 24 new tokens), freed before the next starts."""
    before = set(Path(tempfile.gettempdir()).glob("vllm_dist_*"))
    captioner = float32_vllm(model_source, pruner=request.param, retention=RETENTION)
    # vLLM's rendezvous file goes to a private folder that is gone once the engine is up (issue 30)
    assert set(Path(tempfile.gettempdir()).glob("vllm_dist_*")) == before
    assert not list(Path(tempfile.gettempdir()).glob("avsieve-vllm-*"))
    yield captioner
    del captioner.llm
    gc.collect()


def _plan_pruner(method: str, budget: str, samples: list[dict], model_source: str, layers: int):
    """The run's pruner as the driver would make it: adaptive budgets calibrated on these windows."""
    from operators.pruning import calibrated_c_ref, make_pruner
    from operators.pruning.content import sample_signals

    c_ref = None
    if budget == "adaptive":
        c_ref = calibrated_c_ref(method, RETENTION, [sample_signals(s) for s in samples], layers,
                                 model_source=model_source)
    return make_pruner(method, RETENTION, budget, c_ref, model_source=model_source)


def _expected_positions(thinker_config, sample: dict, kept_media: list[int]):
    """(positions, decode delta, prompt ids) of the pruned request as the HF engine positions its tokens:
    every token keeps its unpruned TMRoPE id, and decoding continues at the unpruned next position."""
    from operators.models.positions import tmrope_positions

    ids = sample["input_ids"].reshape(1, -1)
    audio = sample.get("feature_attention_mask")
    grid = sample.get("video_grid_thw")  # none for sound alone
    full, _ = tmrope_positions(thinker_config, ids, grid.reshape(1, 3) if grid is not None else None,
                               audio.reshape(1, -1).sum(-1) if audio is not None else None,
                               sample["video_second_per_grid"].reshape(1).float() if grid is not None else None)
    is_media = (ids[0] == thinker_config.video_token_id) | (ids[0] == thinker_config.audio_token_id)
    keep = ~is_media
    keep[kept_media] = True
    pruned = full[:, 0, keep].round().long()  # Qwen3-Omni's come as floats holding whole numbers
    prompt = ids[0].clone()
    prompt[kept_media] = thinker_config.video_token_id  # the request's slots are all video placeholders
    return pruned, int(full.max()) + 1 - pruned.shape[1], tuple(prompt[keep].tolist())


def spy_positions(monkeypatch, model_class) -> dict:
    """prompt ids -> [(positions, decode delta)] as `model_class` corrects them after the encoders."""
    seen = {}
    original = model_class.recompute_mrope_positions

    def spy(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        out = original(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens)
        seen.setdefault(tuple(torch.as_tensor(input_ids).tolist()), []).append((out[1].clone(), out[2]))
        return out

    monkeypatch.setattr(model_class, "recompute_mrope_positions", spy)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["fixed", "adaptive"])
def test_both_engines_keep_the_same_tokens_at_the_same_positions_and_caption_alike(
        pruned_engine, budget, windows, hf_captioner, model_source, monkeypatch):
    from operators.engines.vllm_pruning import PrunedOmniThinker

    keys = sorted(windows)
    blobs = [windows[k] for k in keys]
    samples = [tok.unpack(b) for b in blobs]
    method = pruned_engine.settings.pruner
    thinker_config = hf_captioner.thinker.model.config
    pruner = _plan_pruner(method, budget, samples, model_source, thinker_config.get_text_config().num_hidden_layers)
    monkeypatch.setattr(pruned_engine, "pruner", pruner)  # the actor's plans; the model class runs `method`

    seen = spy_positions(monkeypatch, PrunedOmniThinker)
    vl_rows = pruned_engine.caption(blobs)
    hf_rows = hf_captioner.thinker.caption(samples, 24, hook=pruner)

    pruned_any = 0
    for key, sample, kept, a, b in zip(keys, samples, pruned_engine.last_kept, hf_rows, vl_rows):
        assert kept.media.tolist() == a["kept_media"], key  # the same tokens, by their unpruned index
        for field in ROW_FIELDS:
            assert b[field] == a[field], (key, field)
        assert b["prefill_flops"] == pytest.approx(a["prefill_flops"])
        assert b["caption"] == a["caption"], key
        positions, delta, prompt = _expected_positions(thinker_config, sample, a["kept_media"])
        assert any(torch.equal(got.cpu(), positions) and got_delta == delta for got, got_delta in seen[prompt]), key
        pruned_any += len(a["kept_media"]) < a["video_tokens"] + a["audio_tokens"]
    assert pruned_any >= 8  # (a silent or tiny window may keep everything under an adaptive plan)
    assert any(a["video_tokens"] == 0 < a["audio_tokens_kept"] < a["audio_tokens"] for a in hf_rows)  # sound alone


def test_in_decoder_methods_are_refused_before_the_job_with_a_pointer_to_the_hf_engine():
    from operators.engines import resolve_engine
    from operators.engines.vllm import unsupported_options
    from pipelines.config import CaptionConfig

    for method in ("fastv", "fastav"):
        config = CaptionConfig(input="in", output="out", engine="vllm", pruner=method)
        with pytest.raises(ValueError, match="--engine hf") as err:
            resolve_engine("vllm", unsupported_options(config), gpu=False)
        assert method in str(err.value)
    for method in ("random", "uniform", "avex", "echoingpixels"):
        assert unsupported_options(CaptionConfig(input="in", output="out", engine="vllm", pruner=method)) == []


@pytest.mark.slow
def test_pruned_job_on_vllm_meets_its_budget_and_writes_every_row(ray_cluster, clip_set, real_clips, tmp_path):
    """The whole job through Ray: avex with the adaptive budget on vLLM; every window a row with its kept
    counts, the rows' compute share as the budget planned it."""
    vllm_or_skip()
    from pipelines.caption import run

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("av", "long", "video_only", "sound"):
        (folder / clip_set[name].name).write_bytes(clip_set[name].read_bytes())
    for name in REAL_CLIPS:
        (folder / name).write_bytes((real_clips / name).read_bytes())
    config = job_config(str(folder), str(tmp_path / "out"), engine="vllm", pruner="avex", budget="adaptive",
                        retention=0.4, dtype="float32")
    summary = run(config)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert summary["engine"] == "vllm" and len(rows) == 9 and all(r["status"] == "ok" for r in rows)
    (sound,) = [r for r in rows if not r["has_video"]]
    assert sound["video_tokens"] == 0 < sound["audio_tokens_kept"] <= sound["audio_tokens"]
    assert {r["engine"] for r in rows} == {"vllm"} and {r["retention_target"] for r in rows} == {0.4}
    kept = sum(r["video_tokens_kept"] + r["audio_tokens_kept"] for r in rows)
    total = sum(r["video_tokens"] + r["audio_tokens"] for r in rows)
    assert sum(r["video_tokens_kept"] + r["audio_tokens_kept"] < r["video_tokens"] + r["audio_tokens"]
               for r in rows) >= 6  # (a busy window may get the adaptive ceiling, 2.5 x 0.4 = everything)
    # Calibrated on these same windows, the run's token-weighted keep lands on the target.
    assert kept / total == pytest.approx(0.4, abs=0.02)
    assert config.config_hash() != dataclasses.replace(config, pruner="random").config_hash()


def test_a_pruned_engine_captions_repeated_windows_under_kv_pressure_as_before(windows, model_source):
    """Every window four times in one call, with a KV cache of about one unpruned window: vLLM preempts and
    resumes requests, and copies of a window are in flight together; every caption stays what it was alone.
    The engine runs without prefix caching: vLLM 0.32 strips the pixel and audio tensors of a request whose
    media span its prefix cache covers, and the benchmark grid once met a pruned request re-encoded after
    that (KeyError 'pixel_values_videos'). This test did not reproduce that failure with prefix caching on;
    the grid's sequence that failed twice (random, retention 0.4 then 0.2, one engine) ran clean without it."""
    blobs = [windows[k] for k in sorted(windows)]
    longest = max(int(tok.unpack(b)["input_ids"].numel()) for b in blobs) + 24
    blocks = -(-longest // 32) + 2
    captioner = float32_vllm(model_source, max_model_len=None, pruner="random", retention=RETENTION,
                             engine_args={"num_gpu_blocks_override": blocks, "block_size": 32, "max_model_len": longest})
    try:
        assert not captioner.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        first = [r["caption"] for r in captioner.caption(blobs)]
        for _ in range(3):  # every window four times in one call: many requests, little KV space
            assert [r["caption"] for r in captioner.caption(blobs * 4)] == first * 4
    finally:
        del captioner.llm
        gc.collect()
