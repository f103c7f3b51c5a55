"""Type stubs for the server's request path (cython/_srvcore.pyx), the base classes of
ringblob.server.Server and ringblob.server._Connection."""

from typing import Any, Callable

def perf_counter() -> float: ...

class Done:
    cost: int
    def __call__(self, value: bytes | None, err: BaseException | None) -> None: ...

class NetCounters:
    """The base class of ringblob.metrics.Metrics: its hot-path counters as C fields (64-bit)."""
    requests_in_flight: int
    bytes_received: int
    bytes_sent: int

class ServerCore:
    in_flight: int
    stopping: bool
    _eager: dict
    _waiting: set
    _get_nowait: Callable[..., int] | None
    _put_nowait: Callable[..., bool] | None
    _scratch: memoryview
    _scratch_head: memoryview
    _recv_total: int
    _recv_owner: Any
    _recv_waiters: Any
    config: Any
    metrics: Any

class ConnCore:
    server: Any
    loop: Any
    decoder: Any
    transport: Any
    in_flight: int
    reply_reserved: int
    held: Any
    recv_held: int
    out: list
    out_bytes: int
    out_total: int
    stalled: bool
    flush_scheduled: bool
    paused: int
    reading_paused: bool
    closing: bool
    eof: bool
    closed: bool
    rejected: bool
    _in_place: bool
    _head_next: bool
    last_activity: float
    def get_buffer(self, sizehint: int) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def _get_now(self, req: Any, get_nowait: Callable[..., int]) -> bool: ...
    def _new_done(self, req: Any, cost: int, t0: float) -> Done: ...
    def _finish(self, req: Any, parts: list, status: int, t0: float, cost: int = 0) -> None: ...
    def _queue_reply(self, opcode: int, request_id: int, parts: list, status: int) -> None: ...
    def _flush_out(self) -> None: ...
    def _pause(self, why: int) -> None: ...
    def _pause_reading_now(self) -> None: ...
    def _unpause(self, why: int) -> None: ...
