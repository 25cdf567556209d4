"""operators/caption.py without Ray: Captioner.caption_rows on prepared dict rows, and CaptionActor."""

from __future__ import annotations

import pyarrow as pa
import pytest

from operators.caption import CaptionActor, CaptionSettings, Captioner
from operators.prepare import prepare_windows
from operators.schema import COLUMNS, OUTPUT_SCHEMA
from operators.models.qwen2_5_omni import model_label, resolve_model_source

MAX_NEW_TOKENS = 4
LABEL = model_label(resolve_model_source(None))  # name + status from the model card


@pytest.fixture(scope="module")
def rows(clip_set, prepare_settings) -> list[dict]:
    """av (1 window), long (3), video_only (1), zero (1 decode error), silent (1): 7 rows, 6 ok."""
    out = []
    for name in ("av", "long", "video_only", "zero", "silent"):
        base = {"source_id": name, "clip_id": None, "uri": str(clip_set[name]), "start_s": None, "end_s": None,
                "prompt": None}
        out.extend(prepare_windows(base, prepare_settings))
    assert [r["status"] for r in out].count("ok") == 6
    return out


@pytest.fixture(scope="module")
def settings(model_source) -> CaptionSettings:
    return CaptionSettings(model=model_source, device="cpu", max_new_tokens=MAX_NEW_TOKENS, config_hash="h123")


@pytest.fixture(scope="module")
def captioner(settings) -> Captioner:
    return Captioner(settings)


@pytest.fixture(scope="module")
def batch_out(captioner, rows) -> list[dict]:
    return captioner.caption_rows(rows)


def test_one_output_row_per_input_row_in_order(batch_out, rows):
    assert [r["clip_id"] for r in batch_out] == [r["clip_id"] for r in rows]
    assert [r["status"] for r in batch_out] == [r["status"] for r in rows]
    assert set().union(*batch_out) <= set(COLUMNS)  # nothing outside the output contract


def test_ok_rows_have_captions_and_token_counts(batch_out, rows):
    for out, src in zip(batch_out, rows):
        if src["status"] != "ok":
            continue
        assert isinstance(out["caption"], str)
        assert 1 <= out["output_tokens"] <= MAX_NEW_TOKENS
        assert out["video_tokens"] > 0 and out["text_tokens"] > 0
        assert (out["audio_tokens"] > 0) == src["has_audio"]
        # pruner "none": everything kept
        assert (out["video_tokens_kept"], out["audio_tokens_kept"]) == (out["video_tokens"], out["audio_tokens"])
        assert out["prefill_ms"] > 0 and out["generate_ms"] >= 0
        assert (out["model"], out["pruner"], out["config_hash"]) == (LABEL, "none", "h123")
        assert out["has_audio"] == src["has_audio"] and out["decode_ms"] == src["decode_ms"]


def test_rows_say_whether_the_token_limit_cut_the_caption(model_source, rows, batch_out):
    """The trained model ends its captions well within 128 tokens; 4 tokens cut them (greedy: a prefix)."""
    ok = [i for i, r in enumerate(rows) if r["status"] == "ok"][:2]
    roomy = Captioner(CaptionSettings(model=model_source, device="cpu", max_new_tokens=128))
    whole = roomy.caption_rows([rows[i] for i in ok])
    for i, full in zip(ok, whole):
        assert full["caption_truncated"] is False and MAX_NEW_TOKENS < full["output_tokens"] < 128
        assert batch_out[i]["caption_truncated"] is True and batch_out[i]["output_tokens"] == MAX_NEW_TOKENS
        assert full["caption"].startswith(batch_out[i]["caption"])
    assert batch_out[[r["status"] for r in rows].index("error")].get("caption_truncated") is None


def test_error_rows_pass_through_untouched(batch_out, rows):
    errors = [(o, r) for o, r in zip(batch_out, rows) if r["status"] == "error"]
    assert len(errors) == 1
    out, src = errors[0]
    assert (out["status"], out["error_kind"], out["error"]) == ("error", "decode", src["error"])
    assert out.get("caption") is None and out.get("video_tokens") is None
    assert out["model"] == LABEL and out["uri"] == src["uri"]


def test_batch_equals_one_by_one(captioner, rows, batch_out):
    single = [captioner.caption_rows([r])[0] for r in rows]
    keys = ("status", "caption", "text_tokens", "video_tokens", "audio_tokens", "output_tokens")
    assert [tuple(r.get(k) for k in keys) for r in single] == [tuple(r.get(k) for k in keys) for r in batch_out]


def test_broken_blob_becomes_a_model_error_and_spares_the_batch(captioner, rows, batch_out):
    broken = dict(rows[0], clip_id="broken", model_inputs=b"definitely not safetensors")
    out = captioner.caption_rows([rows[1], broken, rows[2]])
    assert [r["status"] for r in out] == ["ok", "error", "ok"]
    assert out[1]["error_kind"] == "model" and out[1]["error"] and out[1].get("caption") is None
    assert [out[0]["caption"], out[2]["caption"]] == [batch_out[1]["caption"], batch_out[2]["caption"]]


def test_no_ok_rows_needs_no_model_call(captioner, rows):
    errors = [r for r in rows if r["status"] == "error"]
    assert [r["status"] for r in captioner.caption_rows(errors)] == ["error"]
    assert captioner.caption_rows([]) == []


def test_caption_actor_returns_the_output_schema(settings, rows):
    actor = CaptionActor(settings)
    table = actor(pa.Table.from_pylist(rows[:4]))
    assert table.schema.equals(OUTPUT_SCHEMA)
    assert table.column("status").to_pylist() == [r["status"] for r in rows[:4]]


def test_sampled_captions_do_not_depend_on_batching(model_source, rows):
    sampler = Captioner(CaptionSettings(model=model_source, device="cpu", max_new_tokens=8, temperature=1.0,
                                        seed=5))
    ok = [r for r in rows if r["status"] == "ok"]
    batch = [r["caption"] for r in sampler.caption_rows(ok)]
    single = [sampler.caption_rows([r])[0]["caption"] for r in ok]
    assert batch == single


def test_decoding_settings_reach_the_model(model_source, rows):
    """--num-beams and --no-repeat-sentences change how the actor decodes, as the thinker would alone."""
    from operators import tokenize as tok

    settings = CaptionSettings(model=model_source, device="cpu", max_new_tokens=24, num_beams=3,
                               no_repeat_sentences=True)
    beamer = Captioner(settings)
    ok = [r for r in rows if r["status"] == "ok"]
    got = [r["caption"] for r in beamer.caption_rows(ok)]
    direct = beamer.engine.thinker.caption([tok.unpack(r["model_inputs"]) for r in ok], 24, num_beams=3,
                                    no_repeat_sentences=True)
    assert got == [d["caption"] for d in direct]
    calls = []
    decode = beamer.engine.thinker.decoder.decode
    beamer.engine.thinker.decoder.decode = lambda *a, **kw: calls.append(kw) or decode(*a, **kw)
    beamer.caption_rows(ok[:1])
    assert calls[0]["num_beams"] == 3 and calls[0]["repeat_ban"] is beamer.engine.thinker.repeat_ban
