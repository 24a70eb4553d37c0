"""The worker's side of the same-host path (DESIGN §2): its segment and what requests say of it.

`LocalPath.renew()` runs at every resolution of the shards. It makes a new segment whose first
region is the worker's parameter buffer (pulls land there, JAX reads the leaves in place) and
whose second is where a gradient is written before its push. A new one each time is what keeps
a shard that was paused and replaced (a zombie that wakes up and finishes an old pull) from
writing into parameters anyone still reads, and a late original of a redone push from reading
a gradient that is being rewritten. Requests to a shard reached through a fault proxy (a route,
DESIGN §7) never name the segment: their bytes must cross the proxy.

When no segment can be made (no /dev/shm, too little room, `shared_memory` off) the buffer is an
ordinary aligned array and every call streams its bytes, as between machines.
"""

from __future__ import annotations

import sys

import numpy as np

from tether.proto import ps_pb2
from tether.shm import Segment, SegmentUnavailable
from tether.wire import Pieces, aligned_empty

PARAMS, GRADS = 0, 1  # the segment's regions


class LocalPath:
    def __init__(self, run_id: str, worker_id: int, num_params: int, enabled: bool) -> None:
        self.run_id, self.worker_id, self.num_params = run_id, worker_id, num_params
        self.enabled = enabled
        self.segment: Segment | None = None
        self.grads: np.ndarray | None = None  # the gradient region, while there is a segment
        self._request_id = 0
        self._warned = False

    def renew(self) -> np.ndarray:
        """A new segment (the previous one's name removed); returns the parameter buffer."""
        self.close()
        if self.enabled:
            try:
                self.segment = Segment.create(self.run_id, f"w{self.worker_id}", self.num_params)
            except SegmentUnavailable as e:
                if not self._warned:
                    self._warned = True
                    print(f"tether worker: streaming over gRPC only: {e}", file=sys.stderr)
        if self.segment is None:
            return aligned_empty(self.num_params)
        self.grads = self.segment.region(GRADS, self.num_params)
        return self.segment.region(PARAMS, self.num_params)

    def ref(self, region: int, offset: int) -> ps_pb2.Segment | None:
        """What a request says about the slice starting at element `offset` of `region`."""
        if self.segment is None:
            return None
        r = self.segment.ref
        return ps_pb2.Segment(
            name=r.name,
            token=r.token,
            size=r.size,
            offset=self.segment.region_offset(region, self.num_params, offset),
        )

    def next_request_id(self) -> int:
        self._request_id += 1
        return self._request_id

    def write_grad(self, grad: Pieces, offset: int) -> None:
        """Copy a gradient slice (elements from `offset`) into the gradient region."""
        assert self.grads is not None
        grad.write_into(self.grads[offset : offset + grad.size])

    def mapped(self) -> None:
        """Every shard has served a pull (and so mapped the segment, or declined it): the name
        can go, and with it anything a killed worker would leave in /dev/shm."""
        if self.segment is not None:
            self.segment.unlink()

    def close(self) -> None:
        if self.segment is not None:
            self.segment.unlink()
        self.segment, self.grads = None, None
