"""Model fingerprints: what changes a checkpoint's model_version, and what does not."""

import json
import os

from operators.models.fingerprint import model_version


def make_checkpoint(folder, weights=b"w1"):
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden": 8}')
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "avsieve_model.json").write_text(json.dumps({"status": "trained", "preprocess": {"fps": 2.0}}))
    (folder / "pruners").mkdir()
    (folder / "pruners" / "avex.safetensors").write_bytes(b"p1")
    return folder


def test_weights_and_configs_change_the_version(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m")
    first = model_version(str(ckpt))
    assert len(first) == 12 and first == model_version(str(make_checkpoint(tmp_path / "copy")))
    (ckpt / "model.safetensors").write_bytes(b"w2")
    os.utime(ckpt / "model.safetensors", ns=(1, 10**18))  # a retrain: new bytes, new mtime
    second = model_version(str(ckpt))
    assert second != first
    (ckpt / "config.json").write_text('{"hidden": 16}')
    assert model_version(str(ckpt)) not in (first, second)


def test_card_prose_and_shipped_pruners_do_not_change_it(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m")
    first = model_version(str(ckpt))
    (ckpt / "avsieve_model.json").write_text(json.dumps({"status": "scored on test", "preprocess": {"fps": 2.0}}))
    (ckpt / "pruners" / "avex.safetensors").write_bytes(b"p2")  # keyed by the pruner's own digest
    (ckpt / "README.md").write_text("notes")
    assert model_version(str(ckpt)) == first
    (ckpt / "avsieve_model.json").write_text(json.dumps({"preprocess": {"fps": 4.0}}))  # changes the input
    assert model_version(str(ckpt)) != first


def test_hub_cache_links_are_named_by_their_blob(tmp_path):
    """A Hugging Face cache snapshot links each file to a blob named by its content hash: no reading."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for name in ("aaa111", "bbb222"):
        (blobs / name).write_bytes(b"same bytes")  # equal bytes, different blob names
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    link = snap / "model.safetensors"
    link.symlink_to(blobs / "aaa111")
    first = model_version(str(snap))
    link.unlink()
    link.symlink_to(blobs / "bbb222")
    assert model_version(str(snap)) != first


def test_unknown_sources_have_no_version(tmp_path):
    assert model_version(str(tmp_path / "absent")) is None
    assert model_version("nobody/not-a-cached-model") is None
