"""The output contract (operators/schema.py) and the Parquet sink helpers (operators/sink.py)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.caption import PASSED_THROUGH
from operators.prepare import PREPARED_COLUMNS
from operators.schema import COLUMNS, OUTPUT_SCHEMA, SCHEMA_VERSION, conform, empty_row
from operators.sink import part_name, read_output

# The columns users and scheduled jobs key on, with their types: changing one needs a SCHEMA_VERSION bump.
CONTRACT = {
    "clip_id": pa.string(), "source_id": pa.string(), "uri": pa.string(), "window_index": pa.int32(),
    "start_s": pa.float64(), "end_s": pa.float64(), "prompt": pa.string(), "caption": pa.string(),
    "status": pa.string(), "error": pa.string(), "error_kind": pa.string(), "model": pa.string(),
    "has_audio": pa.bool_(), "config_hash": pa.string(), "schema_version": pa.string(), "engine": pa.string(),
    "video_width": pa.int32(), "video_height": pa.int32(), "has_video": pa.bool_(),
}


def test_contract_columns_and_types():
    assert SCHEMA_VERSION == "4"
    assert len(set(COLUMNS)) == len(COLUMNS) == len(OUTPUT_SCHEMA)
    for name, dtype in CONTRACT.items():
        assert OUTPUT_SCHEMA.field(name).type == dtype, name
    required = [f.name for f in OUTPUT_SCHEMA if not f.nullable]
    assert required == ["clip_id", "status"]


def test_prepared_rows_map_onto_the_output_schema():
    """Every prepared column except the tensor blob is carried into the output."""
    assert set(PREPARED_COLUMNS) - set(COLUMNS) == {"model_inputs"}
    assert set(PREPARED_COLUMNS) - set(PASSED_THROUGH) == {"model_inputs"}


def test_conform_fills_missing_drops_extra_and_keeps_order():
    table = conform([{"clip_id": "a", "status": "ok", "window_index": 2, "not_a_column": 1},
                     {"clip_id": "b", "status": "error", "error": "boom"}])
    assert table.schema.equals(OUTPUT_SCHEMA)
    assert table.column("clip_id").to_pylist() == ["a", "b"]
    assert table.column("window_index").to_pylist() == [2, None]
    assert table.column("error").to_pylist() == [None, "boom"]
    assert conform([]).num_rows == 0 and conform([]).schema.equals(OUTPUT_SCHEMA)
    assert set(empty_row()) == set(COLUMNS) and not any(empty_row().values())


def test_conform_rejects_wrong_types():
    with pytest.raises(pa.ArrowInvalid):
        conform([{"clip_id": "a", "status": "ok", "window_index": "three"}])


def test_part_name_is_content_addressed():
    name = part_name(["b", "a", "c"])
    assert name == part_name(["c", "b", "a"])  # row order inside the block does not matter
    assert name != part_name(["a", "b"])
    assert name.startswith("part-") and name.endswith(".parquet") and len(name) == len("part-.parquet") + 20


def test_read_output_skips_bookkeeping_and_handles_missing(tmp_path):
    assert read_output(str(tmp_path / "nothing")).schema.equals(OUTPUT_SCHEMA)
    assert read_output(str(tmp_path / "nothing")).num_rows == 0
    pq.write_table(conform([{"clip_id": "a", "status": "ok"}, {"clip_id": "b", "status": "ok"}]),
                   tmp_path / "part-1.parquet")
    (tmp_path / "_avsieve").mkdir()
    pq.write_table(pa.table({"uri": ["x"]}), tmp_path / "_avsieve" / "manifest-1.parquet")
    (tmp_path / "report.json").write_text("{}")  # a user's or a benchmark's file next to the parts
    table = read_output(str(tmp_path))
    assert table.schema.equals(OUTPUT_SCHEMA)
    assert sorted(table.column("clip_id").to_pylist()) == ["a", "b"]
