"""Paths that may be local or on an object store (``gs://``, ``s3://``, ...), through one library: etils.epath.

orbax writes checkpoints through epath too, so a run directory, its checkpoints and a prepared dataset may all
live on ``gs://``. epath's backend for ``gs://`` is TensorFlow's GCS file system when TensorFlow is importable
(what a TPU VM uses), or gcsfs when ``EPATH_USE_TF=false`` (what the tests use: gcsfs and TensorStore can be
pointed at a local GCS emulator, TensorFlow's GCS client cannot).

Object stores differ from a disk in two ways that matter here: an object cannot be appended to or memory-mapped,
and a directory is only a name prefix. Where ctr appends (metrics.jsonl) or needs a local file (TensorBoard's
writer), it works in a local staging directory and copies to the store (the run writer); where it maps
arrays (prepared shards), it reads whole shard files into memory instead (:mod:`ctr.data.prepared`).
"""
from __future__ import annotations

import os
import shutil

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for a URI with a scheme (``gs://bucket/x``), False for a local path."""
    return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
    """``path`` as an epath Path: local paths made absolute (relative to the working directory), URIs as given.

    ``os.path.abspath`` must never see a URI: it turns ``gs://b/run`` into the local folder ``<cwd>/gs:/b/run``.
    """
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(os.path.expanduser(text)))


def join(base: PathLike, *parts: str) -> str:
    """``base/parts...`` as a string, for a local path or a URI alike."""
    return os.fspath(resolve(base).joinpath(*parts))


def exists(path: PathLike) -> bool:
    return resolve(path).exists()


def is_dir(path: PathLike) -> bool:
    return resolve(path).is_dir()


def makedirs(path: PathLike) -> None:
    """Creates ``path`` and its parents (a no-op on stores without directories)."""
    resolve(path).mkdir(parents=True, exist_ok=True)


def read_text(path: PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def read_bytes(path: PathLike) -> bytes:
    return resolve(path).read_bytes()


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copies one file (any store to any store), streamed in 16 MiB pieces."""
    with resolve(src).open("rb") as reader, resolve(dst).open("wb") as writer:
        shutil.copyfileobj(reader, writer, 16 << 20)


def copy_tree(src: PathLike, dst: PathLike) -> list[str]:
    """Copies every file below ``src`` to the same relative place below ``dst`` (overwriting); returns the
    relative paths copied. For staging a local directory to an object store and back."""
    src_root, dst_root = resolve(src), resolve(dst)
    copied = []
    root = _without_scheme(src_root)
    for directory, _, files in src_root.walk():
        below = _without_scheme(directory)[len(root):].strip("/")  # gcsfs walks without the scheme
        for name in files:
            relative = f"{below}/{name}" if below else name
            target = dst_root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            copy_file(src_root / relative, target)
            copied.append(relative)
    return sorted(copied)


def _without_scheme(path: PathLike) -> str:
    text = os.fspath(path)
    return text.split("://", 1)[1] if is_remote(text) else text


def move_tree(src: PathLike, dst: PathLike) -> None:
    """Moves a directory: a rename on a disk; a copy of every object and a delete on an object store, where
    directories cannot be renamed."""
    if not is_remote(src):
        os.rename(resolve(src), resolve(dst))
        return
    copy_tree(src, dst)
    resolve(src).rmtree()
