"""Turn --input (folder, glob, fsspec URI or manifest file) into manifest rows with stable ids.

Each row also records the input's version (size, modification time, ETag from fsspec info()), so a
scheduled rerun can tell a changed file from one it has already captioned. Folder and glob listings get
it for free from the listing. Manifest entries take it from source_size / source_mtime / source_etag
columns if the manifest has them; otherwise nobody stats a million objects up front: the resume planner
stats only inputs that already have rows (operators/resume.py), and prepare stats the rest on the
workers, where the file is opened anyway.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import fsspec
import pyarrow as pa

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv",
                    ".3gp", ".ogv")
AUDIO_EXTENSIONS = (".m4a", ".mp3", ".wav", ".flac", ".ogg", ".opus", ".aac", ".wma")  # captioned from sound alone
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + AUDIO_EXTENSIONS
MANIFEST_EXTENSIONS = (".parquet", ".csv", ".jsonl", ".json")
NOT_TAKEN_EXAMPLES = 5  # names reported per reason

MANIFEST_SCHEMA = pa.schema([
    ("source_id", pa.string()),
    ("clip_id", pa.string()),  # optional user-given id; windows derive theirs from it
    ("uri", pa.string()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("prompt", pa.string()),
    ("source_size", pa.int64()),
    ("source_mtime", pa.float64()),
    ("source_etag", pa.string()),
    ("source_version", pa.string()),
])
VERSION_FIELDS = ("source_size", "source_mtime", "source_etag", "source_version")
STAT_THREADS = 32  # parallel info() calls for manifests (object stores answer each in tens of ms)


def stable_id(*parts) -> str:
    """Short, stable hex id of the given parts (same inputs -> same id on every machine and run)."""
    text = "\x1f".join("" if p is None else (f"{p:.3f}" if isinstance(p, float) else str(p)) for p in parts)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def window_id(source_clip_id: str | None, uri: str, start_s: float, end_s: float, n_windows: int,
              index: int) -> str:
    """clip_id of one window: the user's clip_id for single-window inputs, else a hash of uri + span."""
    if source_clip_id:
        return source_clip_id if n_windows == 1 else f"{source_clip_id}#w{index}"
    return stable_id(uri, float(start_s), float(end_s))


def _epoch(value) -> float | None:
    """Modification times come as floats (local), datetimes (s3fs) or ISO strings (gcsfs)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return float(value)


def version_fields(info: dict | None) -> dict:
    """source_size / source_mtime / source_etag / source_version from one fsspec info() dict.

    A missing or unlistable input still gets a version (of nothing): when it appears, it differs.
    """
    info = info or {}
    size = info.get("size")
    mtime = _epoch(next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated", "timeCreated")
                         if info.get(k) is not None), None))
    etag = next((str(info[k]).strip('"') for k in ("ETag", "etag", "md5Hash", "content_md5")
                 if info.get(k)), None)
    size = int(size) if size is not None else None
    return {"source_size": size, "source_mtime": mtime, "source_etag": etag,
            "source_version": stable_id(size, mtime, etag)}


def stat_version(uri: str) -> dict:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        return version_fields(fs.info(path))
    except Exception:  # noqa: BLE001 - missing / unknown protocol: the job reports it as an error row
        return version_fields(None)


def _is_media(path: str) -> bool:
    return path.lower().endswith(MEDIA_EXTENSIONS)


def not_taken_reason(relative: str) -> str | None:
    """Why a folder listing does not take a file (path relative to the folder), or None if it does."""
    if any(part.startswith(".") for part in relative.split("/")):
        return "hidden"  # dotfiles and dot-folders: .DS_Store, AppleDouble ._clip.mp4, .git/
    return None if _is_media(relative) else "extension"


@dataclass
class NotTaken:
    """Files a folder listing did not take, by reason, with the first few names of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, name: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        names = self.examples.setdefault(reason, [])
        if len(names) < NOT_TAKEN_EXAMPLES:
            names.append(name)

    def as_dict(self) -> dict:
        return {"files": sum(self.counts.values()), "by_reason": dict(sorted(self.counts.items())),
                "examples": {k: self.examples[k] for k in sorted(self.examples)}}

    def line(self) -> str | None:
        """One line for the job's output, or None when every file was taken."""
        if not self.counts:
            return None
        parts = [f"{n} {reason.replace('_', '-')} ({', '.join(self.examples[reason])}"
                 f"{', ...' if n > len(self.examples[reason]) else ''})" for reason, n in sorted(self.counts.items())]
        return (f"note: the input listing did not take {sum(self.counts.values())} file(s): " + "; ".join(parts)
                + " (hidden files and extensions that are neither video nor audio are not captioned)")


def _walk_folder(fs, root: str, not_taken: NotTaken) -> dict:
    """Media files under a folder (with their listing info); what is left out goes into `not_taken`.
    A subfolder that cannot be listed is reported, not silently skipped."""
    found = {}
    try:
        entries = fs.find(root, detail=True, withdirs=False)
    except OSError as err:
        not_taken.add("unreadable_directory", f"{root} ({type(err).__name__})")
        return found
    prefix = root.rstrip("/") + "/"
    for path, info in entries.items():
        relative = path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)
        reason = not_taken_reason(relative)
        if reason is None:
            found[path] = info
        else:
            not_taken.add(reason, relative)
    _unreadable_local_dirs(fs, root, not_taken)
    return found


def _unreadable_local_dirs(fs, root: str, not_taken: NotTaken) -> None:
    """Local folders: fsspec's find skips subfolders it cannot read without a word; name them."""
    import os

    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol not in ("file", "local"):
        return
    for _ in os.walk(root, onerror=lambda err: not_taken.add("unreadable_directory", err.filename)):
        pass


def _with_protocol(fs, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        return path
    return path if "://" in path else f"{protocol}://{path}"


def read_manifest(uri: str) -> list[dict]:
    """Rows of a Parquet / CSV / JSONL manifest with at least a `uri` column."""
    lower = uri.lower()
    with fsspec.open(uri, "rb") as f:
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows = pq.read_table(f).to_pylist()
        elif lower.endswith(".csv"):
            import pyarrow.csv as pcsv

            # Ids and paths are text: never let type inference turn "007" into 7.0.
            strings = {name: pa.string() for name in ("clip_id", "uri", "prompt")}
            rows = pcsv.read_csv(f, convert_options=pcsv.ConvertOptions(column_types=strings)).to_pylist()
        elif lower.endswith(".json"):
            data = json.loads(f.read().decode())
            rows = data if isinstance(data, list) else [data]
        else:
            rows = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    if rows and "uri" not in rows[0]:
        raise ValueError(f"manifest {uri} has no 'uri' column (columns: {sorted(rows[0])})")
    base = posixpath.dirname(uri)
    for row in rows:
        # Relative paths in a manifest are relative to the manifest itself.
        if row.get("uri") and "://" not in row["uri"] and not row["uri"].startswith("/"):
            row["uri"] = posixpath.join(base, row["uri"])
    return rows


def _given_versions(rows: list[dict]) -> None:
    """Version fields from a manifest's own columns, where it has them."""
    for r in rows:
        if r.get("source_version") is None and any(r.get(k) is not None for k in VERSION_FIELDS[:3]):
            r.update(version_fields({"size": r.get("source_size"), "mtime": r.get("source_mtime"),
                                     "etag": r.get("source_etag")}))


def add_versions(rows: list[dict]) -> None:
    """Fill the version fields of rows that have none, with parallel info() calls."""
    todo = [r for r in rows if r.get("source_version") is None]
    if todo:
        with ThreadPoolExecutor(min(STAT_THREADS, len(todo))) as pool:
            for r, fields in zip(todo, pool.map(lambda r: stat_version(r["uri"]), todo)):
                r.update(fields)


def list_inputs(input_uri: str, limit: int | None = None, default_prompt: str = "") -> list[dict]:
    """Manifest rows for --input. Order is sorted by uri so that --limit and ids are reproducible."""
    return scan_inputs(input_uri, limit, default_prompt)[0]


def scan_inputs(input_uri: str, limit: int | None = None, default_prompt: str = "") -> tuple[list[dict], NotTaken]:
    """list_inputs, plus the files a folder listing did not take (a manifest row is always taken: it
    is captioned or becomes an error row; a glob takes what it matched)."""
    not_taken = NotTaken()
    if input_uri.lower().endswith(MANIFEST_EXTENSIONS):
        raw = read_manifest(input_uri)
    else:
        fs, path = fsspec.core.url_to_fs(input_uri)
        if any(ch in path for ch in "*?["):  # the pattern chose these files
            found = {p: i for p, i in fs.glob(path, detail=True).items() if i.get("type") != "directory"}
        elif fs.isdir(path):
            found = _walk_folder(fs, path, not_taken)
        else:
            found = {path: None}  # a single file (missing files become error rows downstream)
        # The listing already carries size / mtime / ETag: no extra call per file.
        raw = [{"uri": _with_protocol(fs, p), **(version_fields(i) if i else {})} for p, i in found.items()]
    rows = []
    for r in raw:
        start = float(r["start_s"]) if r.get("start_s") is not None else None
        end = float(r["end_s"]) if r.get("end_s") is not None else None
        rows.append({
            "source_id": stable_id(r["uri"], start, end),
            "clip_id": str(r["clip_id"]) if r.get("clip_id") not in (None, "") else None,
            "uri": str(r["uri"]),
            "start_s": start,
            "end_s": end,
            "prompt": r.get("prompt") or default_prompt,
            **{k: r.get(k) for k in VERSION_FIELDS},
        })
    rows.sort(key=lambda r: (r["uri"], r["start_s"] or 0.0))
    rows = rows[:limit] if limit is not None else rows
    _given_versions(rows)
    return rows, not_taken
