"""Reintegration: bring the target's copy of one replicated directory up to the source's.

How it works
    The source (the up-to-date primary) drives; the target (SECOND Transient) answers. Both
    talk through the ordered replication connection, so live writes keep flowing meanwhile.
    The source asks with ``ResyncQuery`` frames and changes the target with the ordinary ops
    (Create/Open/Write/Fallocate/Truncate/Release, Mkdir, Symlink, Mknod, Link, Unlink,
    Rmdir, Chmod, Chown, Utimens, xattrs), which the target's Receiver applies under its
    root with its usual safety. Resync handles use numbers from ``RESYNC_FH_BASE`` up, far
    from the FUSE layer's. The parts, one module each:
        resync_codec    query kinds, ``Entry``, ``ActivityLog`` and the reply body codecs
        resync_plan     ``plan_incremental``: what to reconcile, from both activity logs
        resync_fs       reads of the local tree (entries, listings, extents, block sums)
        resync_source   ``Reintegrator``: the source executes the plan, then redo passes
        resync_target   ``Responder``: the target's answers, writeback and syncfs
        resync_direct   ``DirectWriter``: the target's resync pages, O_DIRECT via native AIO
        resync_session  ``Outlet``, ``RedoSet``, ``Progress`` (session times), ``Throttle``
    This module re-exports their public names (and ``ops``), so ``resync.NAME`` works.

    Consistency with live writes: every decision compares a local view and a target view
    taken at the SAME point of the op stream: the local read (lstat, listing, block hashes,
    block data) and the enqueue of the matching query or op happen under the one ordering
    lock that the live replicator holds around ``local()`` + enqueue. Writes are "set"
    operations, so a block equal at that point stays equal. What a live op can still
    invalidate (a namespace change, or an op the target refused because its tree was not in
    sync yet) is put in the ``RedoSet`` by the replicator; the source runs redo passes until
    the set is empty under the lock, and only then sends ``ResyncDone``, which the target
    answers after ``syncfs``: a target that says "done" holds the data on disk.

Exceptions (errors.py): ``ResyncError`` (the target refused, the pass limit was hit),
``ChannelError`` (the connection failed; from the Outlet), ``ProtocolError`` (a malformed
reply body). OSError from the local tree is translated into ResyncError.

Limits
    - A crash before ResyncDone is answered leaves the target not done; the next session
      runs its plan again (ranges already applied are sent again, not resumed).
    - Each part's own limits are in its docstring.
"""

from __future__ import annotations

from app.mirror import ops as ops
from app.mirror.errors import ChannelError as ChannelError
from app.mirror.resync_codec import BLOCK as BLOCK
from app.mirror.resync_codec import DIGEST as DIGEST
from app.mirror.resync_codec import LIST_PAGE as LIST_PAGE
from app.mirror.resync_codec import QUERY_BEGIN as QUERY_BEGIN
from app.mirror.resync_codec import QUERY_BIND as QUERY_BIND
from app.mirror.resync_codec import QUERY_LIST as QUERY_LIST
from app.mirror.resync_codec import QUERY_STAT as QUERY_STAT
from app.mirror.resync_codec import QUERY_SUMS as QUERY_SUMS
from app.mirror.resync_codec import RESYNC_FH_BASE as RESYNC_FH_BASE
from app.mirror.resync_codec import ActivityLog as ActivityLog
from app.mirror.resync_codec import Entry as Entry
from app.mirror.resync_codec import Sum as Sum
from app.mirror.resync_codec import decode_entries as decode_entries
from app.mirror.resync_codec import decode_log as decode_log
from app.mirror.resync_codec import decode_stat as decode_stat
from app.mirror.resync_codec import decode_sums as decode_sums
from app.mirror.resync_codec import encode_entries as encode_entries
from app.mirror.resync_codec import encode_entry as encode_entry
from app.mirror.resync_codec import encode_log as encode_log
from app.mirror.resync_codec import encode_stat as encode_stat
from app.mirror.resync_codec import encode_sums as encode_sums
from app.mirror.resync_fs import SEEK_DATA as SEEK_DATA
from app.mirror.resync_fs import SEEK_HOLE as SEEK_HOLE
from app.mirror.resync_fs import block_sums as block_sums
from app.mirror.resync_fs import clip_extents as clip_extents
from app.mirror.resync_fs import data_extents as data_extents
from app.mirror.resync_fs import entry_in as entry_in
from app.mirror.resync_fs import list_dir as list_dir
from app.mirror.resync_fs import open_dir as open_dir
from app.mirror.resync_fs import open_file as open_file
from app.mirror.resync_fs import parent_of as parent_of
from app.mirror.resync_fs import stat_path as stat_path
from app.mirror.resync_plan import PAGE as PAGE
from app.mirror.resync_plan import Plan as Plan
from app.mirror.resync_plan import blocks_in as blocks_in
from app.mirror.resync_plan import depth as depth
from app.mirror.resync_plan import differing as differing
from app.mirror.resync_plan import merge_ranges as merge_ranges
from app.mirror.resync_plan import plan_incremental as plan_incremental
from app.mirror.resync_plan import under as under
from app.mirror.resync_session import Outlet as Outlet
from app.mirror.resync_session import Progress as Progress
from app.mirror.resync_session import RedoSet as RedoSet
from app.mirror.resync_session import Throttle as Throttle
from app.mirror.resync_session import Ticket as Ticket
from app.mirror.resync_source import COPY_CHUNK as COPY_CHUNK
from app.mirror.resync_source import FALLOC_FL_KEEP_SIZE as FALLOC_FL_KEEP_SIZE
from app.mirror.resync_source import FALLOC_FL_PUNCH_HOLE as FALLOC_FL_PUNCH_HOLE
from app.mirror.resync_source import MAX_REDO_PASSES as MAX_REDO_PASSES
from app.mirror.resync_source import RANGES_PER_HOLD as RANGES_PER_HOLD
from app.mirror.resync_source import STAT_AHEAD as STAT_AHEAD
from app.mirror.resync_source import SUMS_AHEAD as SUMS_AHEAD
from app.mirror.resync_source import SUMS_CHUNK as SUMS_CHUNK
from app.mirror.resync_source import WINDOW_BYTES as WINDOW_BYTES
from app.mirror.resync_source import WINDOW_OPS as WINDOW_OPS
from app.mirror.resync_source import Reintegrator as Reintegrator
from app.mirror.resync_target import FLUSHER_IDLE_WAITS as FLUSHER_IDLE_WAITS
from app.mirror.resync_target import WRITEBACK_BYTES as WRITEBACK_BYTES
from app.mirror.resync_target import Responder as Responder
from app.mirror.resync_target import syncfs as syncfs

__all__ = [
    "ActivityLog",
    "ChannelError",
    "Entry",
    "Plan",
    "Reintegrator",
    "Responder",
]
