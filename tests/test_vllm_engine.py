"""The vLLM engine against transformers and the HF engine: positions, token ids, captions, the job.

Runs where vLLM is installed (.venv-vllm; `.ci/run` requires it there) and is skipped in the main .venv.
"""

from __future__ import annotations

import dataclasses

import pyarrow.parquet as pq
import pytest
import torch

from conftest import job_config, vllm_or_skip
from operators import tokenize as tok
from operators.prepare import prepare_windows

pytestmark = pytest.mark.slow


def _windows(clip_set, real_clips, settings, names, form):
    out = {}
    for name in names:
        uri = str(clip_set[name]) if name in clip_set else str(real_clips / name)
        base = {"source_id": name, "clip_id": None, "uri": uri, "start_s": None, "end_s": None, "prompt": None}
        for row in prepare_windows(base, dataclasses.replace(settings, window_form=form)):
            assert row["status"] == "ok", row["error"]
            out[f"{name}#{row['window_index']}"] = row["model_inputs"]
    return out


# (clip, prepare settings changes): audio-in-video, no audio stream, sound alone, a 3-window clip, another
# fps (9 s at 1 fps: 8 frames, four temporal grid steps 2 s apart, so the chunks differ from 2 fps's)
CASES = {"av": {}, "video_only": {}, "sound": {}, "long": {}, "long@1fps": {"fps": 1.0, "window_s": 10.0}}


@pytest.fixture(scope="module")
def case_windows(clip_set, real_clips, prepare_settings):
    """{case#window: (hf blob, vllm blob)}, each pair from one decode of the same window."""
    out = {}
    for case, changes in CASES.items():
        settings = dataclasses.replace(prepare_settings, **changes)
        name = case.split("@")[0]
        hf = _windows(clip_set, real_clips, settings, [name], "tensors")
        vl = _windows(clip_set, real_clips, settings, [name], "compact")
        out.update({f"{case}#{key.split('#')[1]}": (hf[key], vl[key]) for key in hf})
    assert len(out) == 7  # long: three 3-s windows, or one of 9 s at 1 fps
    return out


def test_compact_window_is_smaller_and_holds_the_same_token_ids(case_windows):
    for case, (hf_blob, vl_blob) in case_windows.items():
        assert torch.equal(tok.unpack(hf_blob)["input_ids"].reshape(-1), tok.unpack_compact(vl_blob)["input_ids"])
        if case.startswith("sound"):  # no frames: 16 kHz float32 samples (64 KB/s) vs mel features (51 KB/s)
            assert tok.unpack_compact(vl_blob)["frames"] is None and len(vl_blob) < 1.3 * len(hf_blob)
        else:
            assert len(vl_blob) < len(hf_blob)  # frames: uint8 vs float32 patches


def test_positions_equal_transformers_and_stock_vllm_differs_with_audio_in_video(case_windows, vllm_captioner,
                                                                                 hf_captioner, monkeypatch):
    """Every window through the real engine: the positions our model class gives vLLM equal the HF thinker's
    own get_rope_index on the HF processor's tensors; stock vLLM's, computed from the same vLLM inputs,
    differ exactly where audio is interleaved (a vLLM upgrade that fixes or changes them shows up here)."""
    from vllm.model_executor.models.qwen2_5_omni_thinker import Qwen2_5OmniThinkerForConditionalGeneration as Stock

    from operators.engines.vllm_model import ExactOmniThinker

    seen = {}
    ours = ExactOmniThinker.get_mrope_input_positions

    def spy(self, input_tokens, mm_features):
        result = ours(self, input_tokens, mm_features)
        seen[tuple(input_tokens)] = (result, Stock.get_mrope_input_positions(self, input_tokens, mm_features))
        return result

    monkeypatch.setattr(ExactOmniThinker, "get_mrope_input_positions", spy)
    vllm_captioner.caption([vl for _, vl in case_windows.values()])
    thinker = hf_captioner.thinker.model.model
    for case, (hf_blob, _) in case_windows.items():
        t = tok.unpack(hf_blob)
        ids = t["input_ids"].reshape(1, -1)
        audio = t.get("feature_attention_mask")
        grid = t.get("video_grid_thw")  # none for sound alone
        reference, delta = thinker.get_rope_index(
            ids, None, grid, torch.ones_like(ids), use_audio_in_video=audio is not None and grid is not None,
            audio_seqlens=audio.sum(-1) if audio is not None else None,
            second_per_grids=t.get("video_second_per_grid"))
        (got, got_delta), (stock, stock_delta) = seen[tuple(ids[0].tolist())]
        assert torch.equal(got, reference[:, 0]) and got_delta == int(delta), case
        interleaved = audio is not None and grid is not None
        assert torch.equal(stock, reference[:, 0]) != interleaved, case


def test_captions_equal_the_hf_engine_in_float32_greedy(clip_set, real_clips, prepare_settings, vllm_captioner,
                                                       hf_captioner):
    from conftest import REAL_CLIPS

    names = ["av", "long", "video_only", "silent", "sound", *REAL_CLIPS]
    hf = _windows(clip_set, real_clips, prepare_settings, names, "tensors")
    vl = _windows(clip_set, real_clips, prepare_settings, names, "compact")
    assert hf.keys() == vl.keys() and len(hf) == 10
    keys = sorted(hf)
    hf_rows = hf_captioner.caption([hf[k] for k in keys])
    vl_rows = vllm_captioner.caption([vl[k] for k in keys])
    for key, a, b in zip(keys, hf_rows, vl_rows):
        assert b["caption"] == a["caption"], key
        for field in ("text_tokens", "video_tokens", "audio_tokens", "video_tokens_kept", "audio_tokens_kept",
                      "output_tokens", "caption_truncated"):
            assert b[field] == a[field], (key, field)
        assert b["prefill_flops"] == pytest.approx(a["prefill_flops"])


def test_a_window_whose_prompt_ids_differ_is_refused(clip_set, real_clips, prepare_settings, vllm_captioner):
    from operators.engines.vllm import PromptMismatch

    (blob,) = _windows(clip_set, real_clips, prepare_settings, ["av"], "compact").values()
    window = tok.unpack_compact(blob)
    wrong = tok.pack_compact(window["input_ids"][:-1], window["frames"], window["fps"], window["audio"],
                             window["prompt_text"], window["size"])
    with pytest.raises(PromptMismatch):
        vllm_captioner.caption([wrong])


def test_job_on_vllm_writes_every_row_with_its_engine(ray_cluster, clip_set, corrupt_payload_clip, tmp_path):
    """The whole job through Ray with --engine vllm: ok rows, an error row for a corrupt file, engine column."""
    vllm_or_skip()
    from pipelines.caption import run

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("av", "video_only", "sound"):
        (folder / clip_set[name].name).write_bytes(clip_set[name].read_bytes())
    (folder / "corrupt.mp4").write_bytes(corrupt_payload_clip.read_bytes())
    config = job_config(str(folder), str(tmp_path / "out"), engine="vllm")
    summary = run(config)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert summary["engine"] == "vllm" and len(rows) == 4
    assert {r["engine"] for r in rows} == {"vllm"}
    by_uri = {r["uri"].rsplit("/", 1)[1]: r for r in rows}
    assert by_uri["corrupt.mp4"]["status"] == "error" and by_uri["corrupt.mp4"]["error"]
    for name in ("av.mp4", "video_only.mp4", "sound.m4a"):
        assert by_uri[name]["status"] == "ok" and by_uri[name]["caption"]
    sound = by_uri["sound.m4a"]
    assert (sound["has_video"], sound["video_tokens"], sound["video_frames"]) == (False, 0, 0)
    assert sound["audio_tokens"] > 0 and by_uri["av.mp4"]["has_video"]
    assert config.config_hash() != dataclasses.replace(config, engine="hf").config_hash()
    assert run(config)["run"]["windows"] == 0  # a rerun of the same configuration finds everything done


def test_audio_in_video_layout_at_another_fps_needs_the_processors_seconds_per_grid(case_windows, vllm_captioner,
                                                                                     monkeypatch):
    """At 1 frame per second, stock vLLM lays out the interleaved chunks for 2 (its default of 1 s per grid
    step): with its layout the prompt ids differ from the HF processor's and the window is refused."""
    from vllm.model_executor.models.qwen2_5_omni_thinker import Qwen2_5OmniThinkerMultiModalProcessor as Stock

    from operators.engines.vllm import PromptMismatch
    from operators.engines.vllm_model import ExactOmniThinkerProcessor

    one_fps = case_windows["long@1fps#0"][1]
    assert vllm_captioner.caption([one_fps])[0]["caption"]
    monkeypatch.setattr(ExactOmniThinkerProcessor, "_get_prompt_updates", Stock._get_prompt_updates)
    with pytest.raises(PromptMismatch):
        vllm_captioner.caption([one_fps])


def _oversized_window(processor, limit: int) -> bytes:
    """A window whose prompt is longer than the model's context: 64 frames of 448x448 pixels."""
    import numpy as np

    frames = np.random.default_rng(0).integers(0, 255, (64, 448, 448, 3), dtype=np.uint8)
    size = tok.video_size(processor, 448 * 448, 448 * 448)
    tensors = tok.model_inputs(processor, frames, 2.0, None, "Describe the clip.", 448 * 448, 448 * 448)
    assert tensors["input_ids"].shape[-1] > limit
    return tok.pack_compact(tensors["input_ids"], frames, 2.0, None, tok.build_prompt(processor, "Describe the clip."),
                            size)


def test_a_window_vllm_refuses_is_an_error_row_and_the_engine_goes_on(clip_set, real_clips, prepare_settings,
                                                                     vllm_captioner):
    from operators.caption import Captioner

    good = _windows(clip_set, real_clips, prepare_settings, ["av", "video_only"], "compact")
    rows = [{"clip_id": key, "uri": key, "status": "ok", "model_inputs": blob} for key, blob in good.items()]
    limit = vllm_captioner.max_model_len
    rows.insert(1, {"clip_id": "big", "uri": "big", "status": "ok",
                    "model_inputs": _oversized_window(vllm_captioner.processor, limit)})
    captioner = Captioner(vllm_captioner.settings, engine=vllm_captioner)
    out = captioner.caption_rows(rows)
    assert [r["status"] for r in out] == ["ok", "error", "ok"]
    assert out[1]["error_kind"] == "model" and "length" in out[1]["error"].lower(), out[1]["error"]
    assert all(r["engine"] == "vllm" for r in out)


def test_an_engine_that_fails_mid_batch_ends_its_process(clip_set, real_clips, prepare_settings, vllm_captioner,
                                                         monkeypatch):
    """A failure inside the engine's step leaves requests behind: the actor process must end (Ray restarts it
    and the crash journal retries its windows) instead of captioning the next batch with a broken engine."""
    import operators.engines.vllm as engine_module

    class Exited(BaseException):
        pass

    def fake_exit(code):
        raise Exited(code)

    def broken_step(*args, **kwargs):
        raise RuntimeError("kernel failure")

    engine = vllm_captioner.llm.llm_engine
    monkeypatch.setattr(engine_module.os, "_exit", fake_exit)
    monkeypatch.setattr(engine, "step", broken_step)
    blobs = list(_windows(clip_set, real_clips, prepare_settings, ["av"], "compact").values())
    try:
        with pytest.raises(Exited):
            vllm_captioner.caption(blobs)
        assert engine.has_unfinished_requests()  # why it had to end: work left inside the engine
    finally:  # this engine serves the session's other tests: take the stranded request out
        monkeypatch.undo()
        engine.abort_request(list(engine.output_processor.request_states), internal=True)
    assert not engine.has_unfinished_requests()


def test_sampled_captions_do_not_depend_on_the_batch(clip_set, real_clips, prepare_settings, vllm_captioner,
                                                     monkeypatch):
    """With --temperature > 0 each window draws from its own seeded stream, as in the HF engine."""
    monkeypatch.setattr(vllm_captioner, "settings", dataclasses.replace(vllm_captioner.settings, temperature=1.0,
                                                                        seed=3))
    blobs = list(_windows(clip_set, real_clips, prepare_settings, ["av", "long", "video_only"], "compact").values())
    batch = [r["caption"] for r in vllm_captioner.caption(blobs)]
    assert batch == [vllm_captioner.caption([b])[0]["caption"] for b in blobs]
    assert batch == [r["caption"] for r in vllm_captioner.caption(blobs[::-1])][::-1]
