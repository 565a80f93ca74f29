"""The data pipeline's view of the storage layer (raytron/storage.py, the one module that talks to
fsspec): the same functions, with a URI no filesystem can open reported as a DataError, the one error
the data pipeline raises for problems a user must fix."""

from __future__ import annotations

import functools

from .. import storage
from ..storage import StorageError, infer_compression, join, local_scratch_root, open_atomic
from .errors import DataError

__all__ = ["exists", "isfile", "isdir", "size", "info", "list_names", "list_files", "full_uri", "local_path",
           "open_file", "read_bytes", "write_bytes_atomic", "upload_file", "download_file", "download_dir",
           "infer_compression", "join", "local_scratch_root", "open_atomic"]


def _data_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StorageError as exc:
            raise DataError(str(exc)) from exc
    return wrapper


exists = _data_errors(storage.exists)
isfile = _data_errors(storage.isfile)
isdir = _data_errors(storage.isdir)
size = _data_errors(storage.size)
info = _data_errors(storage.info)
list_names = _data_errors(storage.list_names)
list_files = _data_errors(storage.list_files)
full_uri = _data_errors(storage.full_uri)
local_path = _data_errors(storage.local_path)
open_file = _data_errors(storage.open_file)
read_bytes = _data_errors(storage.read_bytes)
write_bytes_atomic = _data_errors(storage.write_bytes_atomic)
upload_file = _data_errors(storage.upload_file)
download_file = _data_errors(storage.download_file)
download_dir = _data_errors(storage.download_dir)
