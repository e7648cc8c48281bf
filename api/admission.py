"""Admission: bound the queue in front of the engine, and refuse new work while draining.

The engine runs at most `max_num_seqs` requests at once; the rest wait. Counting the
engine requests in flight here (one per choice) gives the waiting queue's length
without a round trip to the engine thread, so an overloaded server answers 429 at
once: in_flight - max_num_seqs is what waits, and it may not exceed `max_queue`.
"""

from __future__ import annotations

from .errors import APIError


class Admission:
    def __init__(self, max_running: int, max_queue: int | None, retry_after: int = 1):
        self.max_running = max_running
        self.max_queue = max_queue
        self.retry_after = retry_after
        self.in_flight = 0          # engine requests admitted and not yet finished
        self.num_rejected = 0
        self.draining = False

    @property
    def num_queued(self) -> int:
        return max(0, self.in_flight - self.max_running)

    def can_admit(self, n: int) -> bool:
        return self.max_queue is None or self.in_flight + n <= self.max_running + self.max_queue

    def take(self, n: int) -> "Ticket":
        """Hold n engine requests' places until the ticket is released, or raise 429/503 at once."""
        if self.draining:
            raise APIError(503, "the server is shutting down and takes no new requests; retry on another replica",
                           code="draining", headers={"Retry-After": str(self.retry_after)})
        if not self.can_admit(n):
            self.num_rejected += 1
            raise APIError(429, f"the server is at capacity ({self.in_flight} requests in flight, a waiting queue "
                                f"of at most {self.max_queue}); retry after {self.retry_after} s",
                           code="queue_full", headers={"Retry-After": str(self.retry_after)})
        self.in_flight += n
        return Ticket(self, n)


class Ticket:
    """Places held in the admission count; a stream releases them when it ends, however it ends."""

    def __init__(self, admission: Admission, n: int):
        self._admission = admission
        self._n = n

    def release(self) -> None:
        self._admission.in_flight -= self._n
        self._n = 0
