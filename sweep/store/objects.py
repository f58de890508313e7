"""Files in a sweep's storage, a local folder or object storage (s3://, gs://, ... through pyarrow.fs, as Ray Tune
reads the same location). Credentials and endpoint come from where pyarrow looks for them (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, an instance profile).
"""

from __future__ import annotations

import os
import posixpath
import uuid

import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    """Object storage (or any pyarrow filesystem URI) rather than a local folder."""
    return "://" in location


def join(location: str, *parts: str) -> str:
    """A path under location: '/'-separated for URIs whatever the local OS uses."""
    return posixpath.join(location, *parts) if is_uri(location) else os.path.join(location, *parts)


def _fs(location: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def read_bytes(location: str) -> bytes | None:
    """The whole file, or None when there is none."""
    fs, path = _fs(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str, data: bytes) -> None:
    """Write the file so that no reader ever sees part of it: an object store makes an upload visible only once it
    is complete; a local file is written beside the target and renamed over it."""
    fs, path = _fs(location)
    if is_uri(location):
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def delete(location: str) -> None:
    fs, path = _fs(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(folder: str, prefix: str = "", suffix: str = "") -> list[tuple[str, float]]:
    """(location, modification time in seconds) of the files directly in folder whose names match; [] when the folder
    is not there."""
    fs, path = _fs(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [(join(folder, info.base_name), info.mtime.timestamp() if info.mtime else 0.0) for info in infos
            if info.type == pafs.FileType.File and info.base_name.startswith(prefix)
            and info.base_name.endswith(suffix)]


def probe_writable(folder: str) -> str | None:
    """Write and delete an object under folder: None if that worked, else why not (one line). For object storage
    this is the one check that covers a missing bucket, wrong credentials, a wrong endpoint and read-only access."""
    probe = join(folder, f".sweep-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"")
        delete(probe)
    except (OSError, ValueError) as error:  # pyarrow raises OSError for the store's answers, ValueError for bad URIs
        return " ".join(str(error).split())[:300]
    return None
