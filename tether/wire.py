"""Raw-bytes tensor streaming shared by shards and clients (DESIGN §2).

Tensors travel as little-endian float32 bytes in chunks of 1-4 MiB; the receiver copies them once
into a preallocated buffer and views it with ``np.frombuffer``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

FLOAT = np.dtype("<f4")
DEFAULT_CHUNK_BYTES = 2 << 20
# A chunk is at most 4 MiB plus a small header, so 8 MiB leaves headroom while still refusing a
# hostile multi-hundred-megabyte message before it is buffered (RESOURCE_EXHAUSTED).
MAX_MESSAGE_BYTES = 8 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


# Buffers that JAX may read in place: XLA's CPU client aliases a host array instead of copying
# it when the data is this aligned (and copies otherwise), so the worker's pull buffer, and with
# it every parameter leaf whose offset is a multiple of 16 floats, starts on this boundary.
ALIGN_BYTES = 64


def aligned_empty(n: int) -> np.ndarray:
    """An uninitialised float32 vector of `n` elements whose data starts on ALIGN_BYTES."""
    raw = np.empty(n + ALIGN_BYTES // FLOAT.itemsize, dtype=FLOAT)
    skip = (-raw.ctypes.data % ALIGN_BYTES) // FLOAT.itemsize
    return raw[skip : skip + n]


class WireError(ValueError):
    """A stream that does not carry exactly the bytes its header declared."""


def chunk_bytes_of(array: np.ndarray, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """Split a flat float32 array into wire chunks (one copy, as protobuf needs bytes)."""
    return list(iter_chunk_bytes(array, chunk_bytes))


def iter_chunk_bytes(
    array: np.ndarray | Pieces, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[bytes]:
    """`chunk_bytes_of`, one chunk at a time: a stream holds one chunk's copy at once, not a
    copy of the whole array (a 55M-parameter push is 220 MB). At least one chunk, maybe empty."""
    if isinstance(array, Pieces):
        yield from array.chunks(chunk_bytes)
        return
    flat = np.ascontiguousarray(array, dtype=FLOAT)
    step = max(1, chunk_bytes // FLOAT.itemsize)
    for i in range(0, max(flat.size, 1), step):
        yield flat[i : i + step].tobytes()


class Pieces:
    """A flat float32 vector kept as consecutive pieces of other buffers, never joined.

    A worker's gradient is one: the leaves XLA computed, in the parameter tree's flat order
    (DESIGN §2). Sending them piece by piece puts the same bytes on the wire as a joined vector
    would, without the joining copy and its buffer (for a 2M-parameter model at batch 8 that
    copy cost half the model's own gradient step).
    """

    __slots__ = ("pieces", "size")

    def __init__(self, pieces: Iterable[np.ndarray]) -> None:
        self.pieces = [np.asarray(p).reshape(-1) for p in pieces]
        for p in self.pieces:
            if p.dtype != FLOAT:
                raise ValueError(f"pieces must be float32, got {p.dtype}")
        self.size = sum(p.size for p in self.pieces)

    def slice(self, lo: int, hi: int) -> Pieces:
        """Elements [lo, hi), as views of the same pieces."""
        if not 0 <= lo <= hi <= self.size:
            raise ValueError(f"bad range [{lo}, {hi}) of {self.size} elements")
        out, start = [], 0
        for p in self.pieces:
            a, b = max(lo - start, 0), min(hi - start, p.size)
            if a < b:
                out.append(p[a:b])
            start += p.size
        return Pieces(out)

    def chunks(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        """Wire chunks of `chunk_bytes` (the last may be shorter; one empty chunk if empty)."""
        step = max(1, chunk_bytes // FLOAT.itemsize)
        pending: list[bytes] = []
        have = 0
        for p in self.pieces:
            i = 0
            while i < p.size:
                take = min(step - have, p.size - i)
                pending.append(p[i : i + take].tobytes())
                have += take
                i += take
                if have == step:
                    yield pending[0] if len(pending) == 1 else b"".join(pending)
                    pending, have = [], 0
        if pending or self.size == 0:
            yield b"".join(pending)

    def write_into(self, out: np.ndarray) -> None:
        """Copy the pieces, in order, into `out` (a float32 vector of exactly `size`)."""
        if out.shape != (self.size,):
            raise ValueError(f"cannot write {self.size} elements into shape {out.shape}")
        start = 0
        for p in self.pieces:
            out[start : start + p.size] = p
            start += p.size

    def to_array(self) -> np.ndarray:
        """A joined copy (for tests and callers that need one array)."""
        if not self.pieces:
            return np.empty(0, dtype=FLOAT)
        return np.concatenate(self.pieces)


class Assembler:
    """Collects the chunks of one tensor into a preallocated, writable float32 buffer."""

    __slots__ = ("_buf", "_filled")

    def __init__(self, length: int, out: np.ndarray | None = None) -> None:
        if length < 0:
            raise WireError(f"negative tensor length {length}")
        if out is None:
            out = np.empty(length, dtype=FLOAT)
        elif out.dtype != FLOAT or out.shape != (length,) or not out.flags.c_contiguous:
            raise WireError("output buffer does not match the declared tensor")
        self._buf = out.view(np.uint8)
        self._filled = 0

    def add(self, data: bytes) -> None:
        end = self._filled + len(data)
        if end > self._buf.size:
            raise WireError(
                f"stream carries more than the declared {self._buf.size} bytes ({end} bytes so far)"
            )
        self._buf[self._filled : end] = np.frombuffer(data, dtype=np.uint8)
        self._filled = end

    def add_all(self, chunks: Iterable[bytes]) -> None:
        for data in chunks:
            self.add(data)

    def result(self) -> np.ndarray:
        if self._filled != self._buf.size:
            raise WireError(
                f"truncated stream: {self._filled} of the declared {self._buf.size} bytes arrived"
            )
        return self._buf.view(FLOAT)
