"""The folder vLLM loads for a `--model` as users name it, derived once and cached by fingerprint.

vLLM builds Qwen2.5-Omni and Qwen3-Omni thinkers only from a full Omni config (`Qwen2_5OmniConfig` or
the `qwen3_omni_moe` one, with the thinker's under `thinker_config`). A thinker checkpoint (the embedded model, or one avsieve trained) has the thinker
config alone, and neither kind names avsieve's model class. So for any model (thinker folder, full Omni
folder, or a hub id already in the local cache) this writes a folder holding a config that wraps the
thinker's and names `ARCHITECTURE`, next to links to every other file of the checkpoint (weights,
tokenizer, processor, chat template). Weight names need no rewriting: the model class maps both the
thinker's own names and the full checkpoint's `thinker.` prefix. Nothing is copied or converted by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from operators.models.fingerprint import model_version, snapshot_dir

ARCHITECTURE = "AvsieveOmniThinkerForCaptioning"  # registered by operators/engines/vllm_model.py
QWEN3_ARCHITECTURE = "AvsieveQwen3OmniThinker"  # the same for Qwen3-Omni thinkers
STOCK_POSITIONS_ARCHITECTURE = "AvsieveStockPositionsOmniThinker"  # the same with stock vLLM's positions
PRUNED_ARCHITECTURE = "AvsievePrunedOmniThinker"  # the same with joint audio-visual pruning (vllm_pruning.py)
PRUNED_QWEN3_ARCHITECTURE = "AvsievePrunedQwen3OmniThinker"  # and for Qwen3-Omni thinkers
CACHE_ENV = "AVSIEVE_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "avsieve") / "vllm-models"


def default_architecture(model_type: str | None, pruned: bool = False) -> str:
    """avsieve's model class for a checkpoint's family (its config's model_type), with pruning or without."""
    from operators.models.qwen3_omni import MODEL_TYPES as QWEN3_MODEL_TYPES

    if model_type in QWEN3_MODEL_TYPES:
        return PRUNED_QWEN3_ARCHITECTURE if pruned else QWEN3_ARCHITECTURE
    return PRUNED_ARCHITECTURE if pruned else ARCHITECTURE


def wrapped_config(config: dict, architecture: str = ARCHITECTURE) -> dict:
    """A config dict for vLLM: the thinker config wrapped (or the full one kept), text output only, naming
    avsieve's model class. Qwen3-Omni's as qwen3_omni.vllm_config makes it."""
    from operators.models.qwen3_omni import MODEL_TYPES as QWEN3_MODEL_TYPES
    from operators.models.qwen3_omni import vllm_config

    if config.get("model_type") in QWEN3_MODEL_TYPES:
        return {**vllm_config(config), "architectures": [architecture]}
    if config.get("model_type") == "qwen2_5_omni":
        full = dict(config)
    elif config.get("model_type") == "qwen2_5_omni_thinker":
        full = {"model_type": "qwen2_5_omni", "thinker_config": config}
    else:
        raise ValueError(f"not a Qwen2.5-Omni checkpoint (model_type {config.get('model_type')!r})")
    if (full["thinker_config"].get("text_config") or {}).get("sync_rope_section"):
        raise ValueError("this checkpoint was trained with Sync-RoPE (operators/models/rope.py), which the vLLM "
                         "engine does not implement: use --engine hf")
    full.update(architectures=[architecture], enable_audio_output=False)
    return full


def vllm_checkpoint(source: str, architecture: str | None = None) -> str:
    """Path of the vLLM-ready folder for `source` naming `architecture` (default: the family's,
    default_architecture); created on first use, safe against concurrent callers."""
    folder = snapshot_dir(source)
    if folder is None:
        from operators.models.qwen2_5_omni import ModelNotFoundError

        raise ModelNotFoundError(f"cannot find model {source!r} locally (a folder, or a hub id in the local cache)")
    config = json.loads((folder / "config.json").read_text())
    architecture = architecture or default_architecture(config.get("model_type"))
    # Keyed by content and by place: the links point into this folder, and the same files elsewhere (a
    # copy, a temporary test checkpoint) must not reuse links into a folder that may be gone.
    place = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]
    target = cache_root() / f"{folder.name}-{model_version(source)}-{place}-{architecture}"
    if (target / "config.json").is_file():
        if all(path.exists() for path in target.iterdir()):  # exists() follows links: none is dangling
            return str(target)
        shutil.rmtree(target, ignore_errors=True)  # the checkpoint was moved away and back: link again
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    for path in folder.iterdir():
        if path.name != "config.json" and not path.name.startswith("."):
            (staging / path.name).symlink_to(path.resolve())
    (staging / "config.json").write_text(json.dumps(wrapped_config(config, architecture), indent=1))
    try:
        staging.rename(target)  # atomic: a reader sees a complete folder or none
    except OSError:  # another process made it first: theirs is identical
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()
    return str(target)
