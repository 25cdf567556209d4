"""Content fingerprints of model and weights files, so a rerun can tell a retrained model from the old one.

A checkpoint's fingerprint covers what decides its captions: the weights, the configs, the tokenizer and
processor files, and our model card's recommended preprocessing (not the card's prose or scores, which
are edited after training). Files in a Hugging Face cache snapshot are links to blobs named by their
content hash, so those are fingerprinted by name without being read; other files are hashed once per
process (keyed by size and mtime).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

CARD = "avsieve_model.json"
# Files that do not change what the model writes.
IGNORED_SUFFIXES = (".md", ".lock")
IGNORED_NAMES = {".gitattributes", CARD}


def file_sha1(path: str | os.PathLike) -> str:
    """sha1 of a file's bytes (12 hex digits), cached per (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _cached_sha1(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _cached_sha1(path: str, size: int, mtime_ns: int) -> str:  # size and mtime only key the cache
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _content_id(path: Path) -> str:
    if path.is_symlink():
        target = Path(os.readlink(path))
        if "blobs" in target.parts:  # a Hugging Face cache link: the blob's name is its content hash
            return "blob:" + target.name
    return file_sha1(path)


def snapshot_dir(source: str) -> Path | None:
    """The local directory of a model: the path itself, or the cached snapshot of a hub id (no download)."""
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # not cached, not a repo id: the model loader reports that clearly
        return None


def model_version(source: str) -> str | None:
    """12-hex fingerprint of the checkpoint at `source` (path or cached hub id); None if not found."""
    # Trained pruners shipped beside the model: a run that uses one keys its weights in the config hash,
    # and a run without one must not depend on them. (Imported here: operators.pruning imports this module.)
    from operators.pruning.learned import WEIGHTS_DIR

    folder = snapshot_dir(source)
    if folder is None:
        return None
    digest = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if (rel.name in IGNORED_NAMES or rel.name.endswith(IGNORED_SUFFIXES) or rel.parts[0].startswith(".")
                or (len(rel.parts) > 1 and rel.parts[0] == WEIGHTS_DIR)):
            continue
        digest.update(f"{rel.as_posix()}={_content_id(path)}\n".encode())
    card = folder / CARD
    if card.is_file():
        preprocess = json.loads(card.read_text()).get("preprocess")
        digest.update(json.dumps(preprocess, sort_keys=True).encode())
    return digest.hexdigest()[:12]
