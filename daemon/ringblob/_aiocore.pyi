"""Type stubs for the engine adapter's request path (cython/_aiocore.pyx), the base class of
ringblob.engine.aio.AsyncEngine."""

from typing import Any, Callable

SUBMIT_EARLY: int
REAP_TURN: int

def check_result(res: Any, want: int | None = None, what: str = "io") -> int: ...

class AsyncCore:
    engine: Any
    loop: Any
    submits: int
    ops: int
    block_size: int
    buffer_size: int
    buffer_count: int
    queue_depth: int
    def read_nowait(self, offset: int, length: int, done: Callable[[bytes | None, BaseException | None], Any]) -> bool: ...
    def _release_now(self, bufs: list) -> None: ...
    def _flush(self) -> None: ...
    def _on_ready(self) -> None: ...
    def _fail_ops(self, err: BaseException) -> None: ...
    def _init_core(self) -> None: ...
