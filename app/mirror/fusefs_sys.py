"""System calls the ``os`` module lacks, for the primary's FUSE filesystem (fusefs.py), the
receiver and the resync target.

How it works
    ``_renameat2`` and ``_fallocate`` are the C library's ``renameat2(2)`` and ``fallocate(2)``,
    bound with ctypes (``use_errno``) when the module is imported; they return the C result,
    and ``_raise_errno`` turns a non-zero one into ``OSError`` with the call's errno.
    ``start_writeback(fd, offset, length)`` is ``sync_file_range(SYNC_FILE_RANGE_WRITE)``:
    the range's dirty pages start going to disk, nothing waits, errors are ignored (a hint).
    ``_pwrite_all`` repeats ``os.pwrite`` until every byte is written (a pwrite may write
    fewer). The flag constants are the kernel's values for those calls.

Exceptions
    ``OSError(errno)`` from ``_raise_errno`` and ``os.pwrite``, nothing else; MirrorFS passes
    it through unchanged (fusefs.py has the errno table).

Known limits
    - Linux only: the symbols are looked up in the process's C library at import.
    - A write that fails half way (ENOSPC) leaves the written part in the file: ``_pwrite_all``
      raises the failing pwrite's error without undoing what was written before it.
"""

from __future__ import annotations

import ctypes
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_renameat2.restype = ctypes.c_int
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Start writing ``[offset, offset + length)`` of ``fd`` to disk (length 0: to the end)
    without waiting: a later fsync then finds the data written and only flushes the disk's
    cache. Advisory: errors are ignored."""
    _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def _raise_errno(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.pwrite(fd, view[done:], offset + done)
    return done
