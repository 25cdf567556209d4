"""pipelines.evaluate on a hand-built output folder (one error row, one missing clip)."""

import json

import pytest

from operators.schema import conform
from operators.sink import write_part
from pipelines.evaluate import evaluate


def test_evaluate_joins_by_file_and_counts_errors_and_missing(tmp_path):
    refs = [
        {"file": "a.mp4", "caption": "a small red circle moves left. there is no sound.",
         "facts": ["a small red circle moves left", "there is no sound"], "fact_modalities": ["visual", "audio"]},
        {"file": "b.mp4", "caption": "a high tone plays.", "facts": ["a high tone plays"],
         "fact_modalities": ["audio"]},
        {"file": "c.mp4", "caption": "slow beeps play.", "facts": ["slow beeps play"], "fact_modalities": ["audio"]},
    ]
    (tmp_path / "references.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    common = {"config_hash": "h1", "pruner": "none", "window_index": 0, "start_s": 0.0, "end_s": 4.0}
    rows = [
        {**common, "clip_id": "1", "uri": "s3://x/a.mp4", "status": "ok", "caption": refs[0]["caption"]},
        {**common, "clip_id": "2", "uri": "s3://x/b.mp4", "status": "error", "error": "boom", "caption": None},
    ]
    out = tmp_path / "out"
    write_part(conform(rows), str(out))
    result = evaluate(str(out), str(tmp_path / "references.jsonl"))
    assert (result["n"], result["n_missing"], result["n_error"]) == (3, 1, 1)
    assert result["fact_f1_visual"] == 1.0
    assert result["fact_f1_audio"] == pytest.approx(2 * 1 / (1 + 3))
    assert 0 < result["cider"] < 10
    # a.mp4 states one visual and one audio fact; the error row and the missing clip state none
    assert result["stated_facts_per_clip"] == {"visual": pytest.approx(1 / 3), "audio": pytest.approx(1 / 3),
                                               "av": 0.0}
    assert (out / "_avsieve" / "eval-h1.json").exists() and (out / "_avsieve" / "eval-h1.png").exists()
