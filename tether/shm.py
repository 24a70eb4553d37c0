"""Shared-memory segments: the same-host data path between a worker and its shards (DESIGN §2).

A worker whose shards run on its own machine need not stream 4 bytes per parameter through gRPC
and loopback TCP twice per step. It creates one segment in ``/dev/shm`` holding two float32
regions, its parameters (where pulls land and where JAX reads the leaves in place) and its
gradient (where pushes are read from); the calls then carry only their headers and the
segment's name. A shard maps the segment on the first pull that names it.

The rules that keep it as safe as the byte stream:

- the creator writes a random token into the segment's header and every request repeats it: a
  shard that maps a segment of the same name that is not the worker's (another machine, a stale
  name) sees a different token and streams the bytes instead;
- the space is reserved up front (``posix_fallocate``): writing into a tmpfs page that cannot be
  backed raises SIGBUS, which kills a process instead of failing a call, so a segment is only
  made when ``/dev/shm`` has room for it and a margin, and the worker streams bytes otherwise;
- names start ``tether-<run>-``: the launcher removes what a killed worker left
  (``remove_leftovers``), and a worker unlinks its segment's name as soon as every shard has
  mapped it, so the memory goes with the last process that maps it.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tether.wire import FLOAT

SHM_DIR = Path("/dev/shm")
PREFIX = "tether-"
_MAGIC = b"TETHERSEG1"
TOKEN_BYTES = 16
HEADER_BYTES = 4096  # one page: the regions start page-aligned (JAX reads the parameters in place)
# Free space left in /dev/shm after a segment is reserved: other programs use it too.
MARGIN_BYTES = 64 << 20
_NAME = re.compile(r"^tether-[A-Za-z0-9_.-]{1,200}$")


class SegmentUnavailable(OSError):
    """A segment cannot be made or mapped here; the caller streams the bytes instead."""


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", part)


def run_prefix(run_id: str) -> str:
    """What every segment of run `run_id` is named with."""
    return f"{PREFIX}{_safe(run_id)}-"


def _region_bytes(n: int) -> int:
    return -(-n * FLOAT.itemsize // mmap.PAGESIZE) * mmap.PAGESIZE


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """What a request says about a segment: enough for a shard to map and check it."""

    name: str
    token: bytes
    size: int


class Segment:
    """One mapped segment: a header page and float32 regions after it."""

    def __init__(self, ref: SegmentRef, mapping: mmap.mmap, owner: bool) -> None:
        self.ref = ref
        self._mmap = mapping
        self.owner = owner
        self.unlinked = not owner

    @classmethod
    def create(cls, run_id: str, owner: str, floats: int, regions: int = 2) -> Segment:
        """A new segment of `regions` regions of `floats` float32 each, named for this run and
        `owner`, its space reserved; SegmentUnavailable when /dev/shm cannot hold it."""
        if not SHM_DIR.is_dir():
            raise SegmentUnavailable(f"{SHM_DIR} does not exist on this machine")
        size = HEADER_BYTES + regions * _region_bytes(floats)
        try:
            st = os.statvfs(SHM_DIR)
        except OSError as e:
            raise SegmentUnavailable(f"cannot read the free space of {SHM_DIR}: {e}") from e
        free = st.f_bavail * st.f_frsize
        if free < size + MARGIN_BYTES:
            raise SegmentUnavailable(
                f"{SHM_DIR} has {free >> 20} MiB free; a segment of {size >> 20} MiB needs "
                f"{(size + MARGIN_BYTES) >> 20} MiB with the margin"
            )
        name = f"{run_prefix(run_id)}{_safe(owner)}-{os.getpid()}-{secrets.token_hex(16)}"
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise SegmentUnavailable(f"cannot create {path}: {e}") from e
        try:
            os.posix_fallocate(fd, 0, size)  # reserve every page now: no SIGBUS later
            mapping = mmap.mmap(fd, size)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise SegmentUnavailable(f"cannot reserve {size >> 20} MiB in {path}: {e}") from e
        os.close(fd)
        token = secrets.token_bytes(TOKEN_BYTES)
        mapping[: len(_MAGIC) + TOKEN_BYTES] = _MAGIC + token
        return cls(SegmentRef(name, token, size), mapping, owner=True)

    @classmethod
    def attach(cls, ref: SegmentRef) -> Segment:
        """Map the segment a request names; SegmentUnavailable unless it is there, of the size
        the request says, and carries its token."""
        if not _NAME.match(ref.name):
            raise SegmentUnavailable(f"not a segment name: {ref.name!r}")
        path = SHM_DIR / ref.name
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise SegmentUnavailable(f"cannot open {path}: {e}") from e
        try:
            if os.fstat(fd).st_size != ref.size or ref.size < HEADER_BYTES:
                raise SegmentUnavailable(f"{path} is not {ref.size} bytes")
            mapping = mmap.mmap(fd, ref.size)
        finally:
            os.close(fd)
        if mapping[: len(_MAGIC) + TOKEN_BYTES] != _MAGIC + ref.token:
            mapping.close()
            raise SegmentUnavailable(f"{path} is not the segment the request names")
        return cls(ref, mapping, owner=False)

    def region(self, index: int, floats: int) -> np.ndarray:
        """Region `index` (0: parameters, 1: gradient) as a writable float32 vector."""
        start = HEADER_BYTES + index * _region_bytes(floats)
        return self.floats(start, floats)

    def floats(self, byte_offset: int, n: int) -> np.ndarray:
        """`n` float32 at `byte_offset`, as a view of the mapping; ValueError when out of range."""
        end = byte_offset + n * FLOAT.itemsize
        if byte_offset < HEADER_BYTES or n < 0 or end > self.ref.size or byte_offset % 4:
            raise ValueError(f"range [{byte_offset}, {end}) is outside the segment's regions")
        return np.frombuffer(self._mmap, dtype=FLOAT, count=n, offset=byte_offset)

    def region_offset(self, index: int, floats: int, element: int) -> int:
        """Byte offset of element `element` of region `index`."""
        return HEADER_BYTES + index * _region_bytes(floats) + element * FLOAT.itemsize

    def unlink(self) -> None:
        """Remove the name (the creator, once every reader has mapped it); the memory stays
        until the last mapping goes."""
        if not self.unlinked:
            self.unlinked = True
            (SHM_DIR / self.ref.name).unlink(missing_ok=True)


def remove_leftovers(run_id: str) -> list[str]:
    """Unlink every segment name of run `run_id` still in /dev/shm (left by killed workers)."""
    removed = []
    prefix = run_prefix(run_id)
    if SHM_DIR.is_dir():
        for path in SHM_DIR.glob(f"{prefix}*"):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed
