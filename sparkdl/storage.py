"""[any] The storage seam: every byte a run or a dataset reads or writes goes through here.

Locations are string URIs resolved with ``pyarrow.fs``: a local path (made absolute),
``file://``, ``hdfs://``, ``s3://``, ``gs://`` or anything else
``pyarrow.fs.FileSystem.from_uri`` understands; other schemes (``abfs://``, ``gs://`` where
pyarrow was built without it, ...) fall back to fsspec wrapped in ``pyarrow.fs.PyFileSystem``
when fsspec and the scheme's implementation are installed. FUSE mounts (``/dbfs/...``,
``/Volumes/...``) are local paths. A URI is never turned into a local path silently.

Two layers:

- URI functions (:func:`read_file`, :func:`write_file`, :func:`list_dir`, :func:`delete`, ...)
  for the run directory's small files;
- ``(filesystem, path)`` functions (:func:`resolve`, :func:`open_input`, ...) for datasets,
  which resolve their root once and stream many files.

Commit rule, correct on object stores: :func:`write_file` publishes a file whole or not at all
(a local or HDFS file is written under a temporary name and renamed; an object store publishes an
object only when its single upload completes). Nothing here renames a directory or relies on
listings beyond what S3 guarantees (strong read-after-write, no atomic multi-object operations),
so callers commit a set of files by writing the payload first and a marker file last.
Only pyarrow APIs present since pyarrow 14 are used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid

import pyarrow.fs as pafs

from sparkdl.errors import ConfigError

__all__ = [
    "normalize_uri",
    "is_local",
    "local_path",
    "path_exists",
    "is_dir",
    "list_dir",
    "read_file",
    "write_file",
    "delete",
    "make_dirs",
    "check_writable",
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
    """Publish ``data`` at ``path`` whole or not at all (see :func:`write_file`).

    Local and HDFS filesystems: a hidden temporary name next to ``path``, then a rename (atomic
    there). Object stores and others: one upload, which publishes the object only when it
    completes; on an error the stream is not closed, so no partial object appears.
    """
    if fs.type_name not in ("local", "hdfs"):
        out = open_output(fs, path)
        out.write(data)
        out.close()  # only after a complete write: closing is what publishes the object
        return
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


# ---------------------------------------------------------------- URI functions


def _scheme(uri: str) -> str:
    return uri.partition("://")[0].lower() if _has_scheme(uri) else ""


def is_local(uri: str) -> bool:
    """Whether ``uri`` is on this machine's filesystem (a plain path, a FUSE mount, ``file://``)."""
    return _scheme(uri) in ("", "file")


def local_path(uri: str) -> str | None:
    """The absolute local path of a local ``uri`` (see :func:`is_local`), None for remote URIs."""
    if not is_local(uri):
        return None
    if uri.startswith("file://"):
        uri = uri[len("file://") :] or "/"
    return normalize_uri(uri)


def path_exists(uri: str) -> bool:
    """Whether a file or directory is at ``uri``."""
    fs, path = resolve(uri)
    return exists(fs, path)


def is_dir(uri: str) -> bool:
    """Whether a directory is at ``uri`` (on object stores: any object under that prefix)."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_dir(uri: str) -> list[str]:
    """Names directly under the directory ``uri``, sorted; [] when there is none."""
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except (NotADirectoryError, FileNotFoundError):
        return []
    return sorted(info.base_name for info in infos)


def read_file(uri: str) -> bytes:
    """The whole content of the (small) file at ``uri``; FileNotFoundError when there is none."""
    fs, path = resolve(uri)
    return read_bytes(fs, path)


def write_file(uri: str, data: bytes) -> None:
    """Publish ``data`` at ``uri`` whole or not at all, creating parent directories.

    Local: a hidden temporary file beside it (Spark and pyarrow readers skip dot files), fsync,
    then ``os.replace``. Elsewhere see :func:`write_bytes_atomic`.
    """
    path = local_path(uri)
    if path is not None:
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        return
    fs, fs_path = resolve(uri)
    write_bytes_atomic(fs, fs_path, data)


def delete(uri: str) -> None:
    """Delete the file or directory tree at ``uri``; nothing there is fine."""
    fs, path = resolve(uri)
    remove_tree(fs, path)


def make_dirs(uri: str) -> None:
    """Create the directory ``uri`` and its parents (a no-op on object stores)."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def check_writable(uri: str, what: str) -> None:
    """ConfigError naming ``what`` and ``uri`` unless a probe file can be written and deleted.

    Catches a mistyped bucket, missing credentials, an unreachable endpoint or a read-only mount
    on the driver, before any task starts.
    """
    probe = join(normalize_uri(uri), f".sparkdl-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_file(probe, b"ok")
        delete(probe)
    except ConfigError:
        raise
    except Exception as exc:  # OSError, botocore/fsspec errors, pyarrow's ArrowException ...
        raise ConfigError(
            f"{what} must be a location this driver can write, got {uri!r} "
            f"({type(exc).__name__}: {exc}). Check the path or bucket name, the credentials and "
            "the endpoint; every worker must reach it too"
        ) from exc
