"""A model's identity for cache keys and provenance: the SHA-256 of every file its results depend on.

The files of a checkpoint folder are its top-level files (weights, config, generation config, processor, tokenizer,
chat template, ...), all but hidden files and ``*.md`` notes, named by their file name only, so an unchanged copy
of a model in another folder has the same identity and shares the results cache. Each file's SHA-256 is

- for a file of a Hugging Face hub snapshot that links to a content-addressed blob named by its SHA-256 (large,
  Git LFS files: the weights): the blob's name, so gigabytes are never read again;
- otherwise streamed over the file once, and remembered in a small JSON index beside the results cache
  (:data:`INDEX_FILE`), keyed by the file's absolute path, size, mtime, ctime and inode, so the next load reads
  nothing. An entry is trusted only for a file that had not changed for a second when it was hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from mmflow.checkpoints import Located, locate

#: the index of file digests, in the results cache folder
INDEX_FILE = "model-file-digests.index"  # JSON; not *.json, which holds results
SHA256 = re.compile(r"[0-9a-f]{64}")
#: an index entry is trusted only if the file had not changed for this long when it was hashed (racy writes)
SETTLED_NS = 1_000_000_000


@dataclass(frozen=True)
class Identity:
    """A model's identity: ``sha256`` over its files' names and digests; ``files``: name -> SHA-256; ``revision``:
    the hub commit of a cached snapshot (None for a local folder)."""

    sha256: str
    files: dict[str, str]
    revision: str | None = None


def model_files(folder: Path) -> list[Path]:
    """The files of a checkpoint folder that its results may depend on (top level, not hidden, not ``*.md``),
    sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != ".md"
    )


def _stat_key(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def stream_sha256(path: Path) -> str:
    """The SHA-256 of a file's content, streamed (the file is never held in memory)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def blob_sha256(path: Path) -> str | None:
    """The SHA-256 a hub snapshot's file is known by without reading it: the name of the content-addressed blob it
    links to, if that is a SHA-256 (Git LFS files); None otherwise."""
    if not path.is_symlink():
        return None
    target = Path(os.readlink(path))
    if target.parent.name == "blobs" and SHA256.fullmatch(target.name):
        return target.name
    return None


class DigestIndex:
    """Remembered file digests, keyed by absolute path and (size, mtime, ctime, inode); saved as JSON."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.changed = False
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError):
                loaded = {}
            self.entries = loaded if isinstance(loaded, dict) else {}

    def digest(self, path: Path) -> str:
        """The file's SHA-256: remembered if the file is unchanged since it was hashed, else streamed."""
        name, key = os.path.abspath(path), _stat_key(path)
        entry = self.entries.get(name)
        entry = entry if isinstance(entry, dict) else {}
        if {k: entry.get(k) for k in key} == key and SHA256.fullmatch(str(entry.get("sha256"))):
            return entry["sha256"]
        started = time.time_ns()
        digest = stream_sha256(path)
        if _stat_key(path) == key and key["mtime_ns"] + SETTLED_NS <= started:
            self.entries[name] = {**key, "sha256": digest}
            self.changed = True
        return digest

    def save(self) -> None:
        """Write the index atomically (if it changed); a cache that cannot take it only costs a re-read later."""
        if self.path is None or not self.changed:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.entries, indent=0, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as err:
            warnings.warn(f"Could not save the model file digests to {self.path} ({err})", stacklevel=2)
        self.changed = False


def folder_identity(folder: Path, index_dir: str | Path | None = None, revision: str | None = None) -> Identity:
    """The identity of the checkpoint in ``folder`` (see the module docstring); digests are remembered in
    ``index_dir/`` :data:`INDEX_FILE` if ``index_dir`` is given.

    Example:
        >>> from mmflow.checkpoints import EMBEDDED_MODEL_DIR
        >>> len(folder_identity(EMBEDDED_MODEL_DIR).sha256)
        64
    """
    index = DigestIndex(Path(index_dir) / INDEX_FILE if index_dir is not None else None)
    files = {path.name: blob_sha256(path) or index.digest(path) for path in model_files(folder)}
    index.save()
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return Identity(digest, files, revision)


def model_identity(located: Located, index_dir: str | Path | None = None) -> Identity:
    """The identity of a located model (:func:`mmflow.checkpoints.locate`): of its folder or cached hub snapshot.

    A hub id that was downloaded while loading is located again in the hub cache first.
    """
    if located.folder is None:
        located = locate(located.path, local_files_only=True)
    return folder_identity(located.folder, index_dir, located.revision)
