"""Models as users name them, for both engines: a full Qwen2.5-Omni checkpoint folder and a hub id in the
local cache work like the embedded thinker folder, with nothing converted by hand."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

from conftest import vllm_or_skip
from operators.prepare import prepare_windows

pytestmark = pytest.mark.slow

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, model_source):
    """A hub cache holding `avsieve-test/tiny-omni`: the embedded thinker repackaged as a full Qwen2.5-Omni
    checkpoint (Omni config wrapping the thinker's, `thinker.` weight names), as Qwen/Qwen2.5-Omni-7B is."""
    from pathlib import Path

    cache = tmp_path_factory.mktemp("hub")
    snapshot = cache / "models--avsieve-test--tiny-omni" / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (cache / "models--avsieve-test--tiny-omni" / "refs").mkdir()
    (cache / "models--avsieve-test--tiny-omni" / "refs" / "main").write_text(REVISION)
    embedded = Path(model_source)
    for path in embedded.iterdir():
        if path.is_file() and path.name not in ("config.json", "model.safetensors", "avsieve_model.json"):
            shutil.copy(path, snapshot / path.name)
    thinker = json.loads((embedded / "config.json").read_text())
    full = {"model_type": "qwen2_5_omni", "architectures": ["Qwen2_5OmniModel"], "enable_audio_output": False,
            "thinker_config": thinker}
    (snapshot / "config.json").write_text(json.dumps(full))
    weights = load_file(embedded / "model.safetensors")
    save_file({f"thinker.{k}": v for k, v in weights.items()}, snapshot / "model.safetensors")
    return cache, snapshot


def test_the_vllm_folder_of_a_hub_id_is_the_one_of_its_snapshot(hub_cache, monkeypatch, tmp_path):
    import huggingface_hub.constants

    from operators.engines.vllm_checkpoint import ARCHITECTURE, vllm_checkpoint

    cache, snapshot = hub_cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("AVSIEVE_CACHE", str(tmp_path))
    folder = vllm_checkpoint("avsieve-test/tiny-omni")
    assert folder == vllm_checkpoint(str(snapshot))  # one folder per model fingerprint
    config = json.loads((tmp_path / "vllm-models" / folder.rsplit("/", 1)[1] / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and config["model_type"] == "qwen2_5_omni"
    assert config["thinker_config"]["text_config"]["hidden_size"] > 0


def test_a_full_omni_checkpoint_captions_like_the_embedded_thinker_in_both_engines(
        hub_cache, clip_set, prepare_settings, hf_captioner, ray_cluster, tmp_path):
    """The HF engine in this process; the vLLM engine through the job (its own actor process, as users
    run it), with --model naming the full checkpoint's folder."""
    from operators.engines.hf import HfCaptioner
    from pipelines.caption import run

    from conftest import job_config

    vllm_or_skip()
    _, snapshot = hub_cache
    base = {"source_id": "av", "clip_id": None, "uri": str(clip_set["av"]), "start_s": None, "end_s": None,
            "prompt": None}
    (window,) = prepare_windows(base, prepare_settings)
    expected = hf_captioner.caption([window["model_inputs"]])[0]["caption"]
    full = HfCaptioner(dataclasses.replace(hf_captioner.settings, model=str(snapshot)))
    assert full.caption([window["model_inputs"]])[0]["caption"] == expected
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(clip_set["av"], folder / "av.mp4")
    pixels = {k: getattr(prepare_settings, k) for k in ("max_pixels", "min_pixels", "window_s")}
    run(job_config(str(folder), str(tmp_path / "out"), model=str(snapshot), engine="vllm", dtype="float32",
                   max_new_tokens=24, prompt=prepare_settings.prompt, **pixels))
    (row,) = pq.read_table(tmp_path / "out").to_pylist()
    assert (row["status"], row["engine"], row["caption"]) == ("ok", "vllm", expected)
