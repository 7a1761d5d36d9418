"""[any] Storage seam: dataset roots are string URIs resolved with ``pyarrow.fs``.

A root may be a local path (made absolute), ``file://``, ``hdfs://``, ``s3://``, ``gs://`` or
anything else ``pyarrow.fs.FileSystem.from_uri`` understands; other schemes fall back to
fsspec (wrapped in ``pyarrow.fs.PyFileSystem``) when fsspec is installed. Paths inside a dataset
are POSIX-style and relative to its root. Only pyarrow APIs present since pyarrow 14 are used.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import pyarrow.fs as pafs

from sparkdl.errors import ConfigError

__all__ = [
    "normalize_uri",
    "resolve",
    "join",
    "exists",
    "remove_tree",
    "read_bytes",
    "write_bytes_atomic",
    "open_input",
    "open_output",
    "sha256_of",
    "copy_file",
]

_HASH_CHUNK = 8 << 20


def _has_scheme(uri: str) -> bool:
    head, sep, _ = uri.partition("://")
    return bool(sep) and head.isidentifier()


def normalize_uri(uri: str) -> str:
    """``uri`` with a local path made absolute (executors must not depend on the driver's cwd)."""
    if not isinstance(uri, str) or not uri:
        raise ConfigError(
            f"path must be a non-empty string, got {uri!r}. Pass a local path or a URI."
        )
    if _has_scheme(uri):
        return uri.rstrip("/") if not uri.endswith("://") else uri
    return os.path.abspath(os.path.expanduser(uri))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the filesystem-local path for ``uri``."""
    uri = normalize_uri(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError, TypeError) as arrow_error:
        try:
            import fsspec  # optional fallback for schemes pyarrow does not know
        except ImportError:
            raise ConfigError(
                f"path must be a URI pyarrow.fs understands, got {uri!r} ({arrow_error}). "
                "Use a local path, file://, hdfs://, s3:// or gs://, or install fsspec."
            ) from arrow_error
        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(root: str, *parts: str) -> str:
    """POSIX join of a filesystem path (or URI) and relative parts."""
    out = root.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """Whether anything (file or directory) is at ``path``."""
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def remove_tree(fs: pafs.FileSystem, path: str) -> None:
    """Delete the file or directory tree at ``path``; nothing there is fine."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type != pafs.FileType.NotFound:
        fs.delete_file(path)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole content of a (small) file."""
    with fs.open_input_stream(path) as f:
        return f.read()


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def open_output(fs: pafs.FileSystem, path: str):
    """A writable stream at ``path``, creating parent directories where the filesystem has them."""
    parent = _parent(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    return fs.open_output_stream(path)


def open_input(fs: pafs.FileSystem, path: str):
    """A random-access file at ``path`` (what ``pq.ParquetFile`` wants)."""
    return fs.open_input_file(path)


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name next to ``path``, then rename it into place.

    Readers therefore see either no file or the complete file (rename is atomic on local and
    HDFS filesystems; object stores publish an object only when its upload completes).
    """
    parent = _parent(path)
    name = path.rsplit("/", 1)[-1]
    tmp = join(parent, f".{name}.{uuid.uuid4().hex}.tmp") if parent else f".{name}.tmp"
    with open_output(fs, tmp) as out:
        out.write(data)
    try:
        fs.move(tmp, path)
    except Exception:
        remove_tree(fs, tmp)
        raise


def sha256_of(fs: pafs.FileSystem, path: str) -> tuple[str, int]:
    """(hex sha256, size in bytes) of the file at ``path``, streamed in 8 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with fs.open_input_stream(path) as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def copy_file(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Copy one file within ``fs``, creating the destination's parent directories."""
    parent = _parent(dst)
    if parent:
        fs.create_dir(parent, recursive=True)
    fs.copy_file(src, dst)
