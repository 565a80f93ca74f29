"""The data pipeline's view of the storage layer (raytron/storage.py, the one module that talks to
fsspec): the same functions, with a URI no filesystem can open reported as a DataError, the one error
the data pipeline raises for problems a user must fix."""

from __future__ import annotations

import functools

from .. import storage
from ..storage import StorageError, infer_compression, is_local, join, local_scratch_root, open_atomic
from .errors import DataError

__all__ = ["fs_and_path", "exists", "isfile", "list_names", "read_bytes", "write_bytes_atomic", "infer_compression",
           "is_local", "join", "local_scratch_root", "open_atomic"]


def _data_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StorageError as exc:
            raise DataError(str(exc)) from exc
    return wrapper


fs_and_path = _data_errors(storage.fs_and_path)
exists = _data_errors(storage.exists)
isfile = _data_errors(storage.isfile)
list_names = _data_errors(storage.list_names)
read_bytes = _data_errors(storage.read_bytes)
write_bytes_atomic = _data_errors(storage.write_bytes_atomic)
