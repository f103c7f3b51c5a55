"""I/O-error loop: fail the Nth engine operation of a scripted store workload, for N = 1, 2, 3, ...

SQLite's I/O-error loop for ringblob. One *run* executes a fixed, seeded
workload (format, close, reopen, puts sync and not, a large streamed value,
a large value received into leased buffers and written as it arrives, one
given up half way, deletes, put_many, flush, get, list, checkpoint, a group commit of concurrent
sync puts, a crash (``abandon``) and a recovery, close) over an engine wrapped
by :class:`CountingFaulty` (a :class:`ringblob.engine.faulty.FaultyEngine`
that counts *every* engine op — read, write, fdatasync, across every open of
the store, the format writes and recovery reads included — and fails the
``N``-th one with EIO). Mode ``single`` fails that op only; mode ``sticky``
fails it and every later op of the same kind (a dead disk: ``FaultyEngine``'s
``sticky``).

Each step checks that the error reaches the caller as the right exception:

* a write request (put, put_many, delete, flush) whose commit lost a write or
  an fdatasync raises :class:`IOFailed` with ``errno == EIO``; the store is
  read-only from then on (:class:`ReadOnly` for later writes, and for a flush
  while acknowledged writes are not durable), reads go on;
* a failed read fails that ``get`` only (:class:`IOFailed`, ``errno`` EIO),
  the store stays writable;
* ``checkpoint()`` / ``close()`` fail with ``IOFailed`` (EIO) only when the
  fault fired inside them (``close()`` may also just log it); an open with a
  fault in its reads (or in the format writes) fails with ``IOFailed`` (or
  ``Corrupt`` when no checkpoint can be read) or opens a store that holds
  every acknowledged write;
* a bare ``OSError`` or any other exception is a violation, and so is a hang
  (every step runs under a timeout);
* every ``get`` returns exactly a value put for the key (the state of its
  last acknowledged operation or of one issued after it), never other bytes.

After the run the store is abandoned and reopened *without* faults. It must
open and hold every acknowledged write (without a power cut nothing
acknowledged may vanish; ``acknowledged_lost`` counts the durable ones, the
others are reported as violations too), list() must agree with get(), and it
must take a new write. The loop stops at the first ``N`` for which no fault
fired (the workload has fewer ops than ``N``).

Run directly for the torture figures: ``python tests/ioerrors.py`` (several
seeded workloads, both modes, every N).
"""

from __future__ import annotations

import argparse
import asyncio
import errno as _errno
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

import blake3

import powerloss  # (tests/: its put_leased, the daemon's large PUT)
from ringblob.engine.faulty import FaultyEngine
from ringblob.errors import Corrupt, IOFailed, NotFound, ReadOnly
from ringblob.store import BlobStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSENT = "absent"

STORE_SIZE = 4 << 20
JOURNAL_SIZE = 256 << 10
CHECKPOINT_THRESHOLD = 24 << 10
BUFFER_SIZE = 64 << 10
BUFFER_COUNT = 16
STEP_TIMEOUT = 20.0  # seconds: a step that takes longer is a hang
READ_ONLY_GRACE = 2.0  # seconds: a failed write delivered to the store turns it read-only within this


class CountingFaulty(FaultyEngine):
    """A FaultyEngine that numbers every op (read, write, fdatasync) from 1 in ``shared``
    (one dict across every engine of a run, so numbering spans reopens) and fails op
    number ``shared["target"]`` with EIO; with ``sticky`` every later op of that kind fails too.

    ``shared`` keys: ``ops`` (ops queued so far), ``target`` (the op to fail, 0: none),
    ``fired`` (the kind that was failed, or None), ``injected`` (failed completions
    of all engines of the run, cancellations included).
    """

    def __init__(self, inner, shared: dict, sticky: bool):
        super().__init__(inner, sticky=sticky)
        self._shared = shared
        if sticky and shared.get("fired"):
            self._dead[shared["fired"]] = True  # the disk stays dead across reopens

    def _count(self, kind: str) -> None:
        s = self._shared
        s["ops"] += 1
        if s["ops"] == s["target"]:
            s["fired"] = kind
            s["fired_at"] = s["step"]
            self.fail_next(kind, 1)

    def write_fixed(self, buf, offset, length, tag, *, buf_offset=0, file_index=0, link=False, dsync=False):
        self._count("write")
        return super().write_fixed(buf, offset, length, tag, buf_offset=buf_offset, file_index=file_index, link=link,
                                   dsync=dsync)

    def read_fixed(self, buf, offset, length, tag, *, buf_offset=0, file_index=0, link=False):
        self._count("read")
        return super().read_fixed(buf, offset, length, tag, buf_offset=buf_offset, file_index=file_index, link=link)

    def fdatasync(self, tag, *, file_index=0, link=False):
        self._count("fdatasync")
        return super().fdatasync(tag, file_index=file_index, link=link)

    def _map(self, cqes):
        before = self.injected
        out = super()._map(cqes)
        self._shared["injected"] += self.injected - before
        if self.injected > before and self._shared["fired"] in ("write", "fdatasync"):
            self._shared["wfault"] = True  # a failed write or fdatasync was delivered to the store
        return out


class _Model:
    """Per key: the states of the ops issued, in order, and which of them returned (acked)
    and which are known durable. A state is a BLAKE3 digest or ABSENT."""

    def __init__(self):
        self.ops: dict[bytes, list] = {}
        self.acked: dict[bytes, int] = {}
        self.durable: dict[bytes, int] = {}

    def issue(self, key: bytes, state) -> int:
        self.ops.setdefault(key, []).append(state)
        return len(self.ops[key]) - 1

    def ack(self, key: bytes, i: int, durable: bool) -> None:
        self.acked[key] = max(self.acked.get(key, -1), i)
        if durable:
            self.durable[key] = max(self.durable.get(key, -1), i)

    def all_durable(self) -> None:
        """A flush / checkpoint / clean close returned: every acked op is durable."""
        for k, i in self.acked.items():
            self.durable[k] = max(self.durable.get(k, -1), i)

    def allowed(self, key: bytes, floor: dict) -> set:
        ops = self.ops.get(key, [])
        i = floor.get(key, -1)
        return set(ops[i:]) if i >= 0 else set(ops) | {ABSENT}


@dataclass
class RunResult:
    """One run (one N in one mode) of the loop; ``violations`` empty means every check held."""

    seed: int
    mode: str
    n: int
    fired: str | None = None  # the kind of op failed, None when the workload had fewer ops than n
    fired_at: str = ""
    injected: int = 0
    steps: int = 0
    error_steps: int = 0  # steps that raised an expected error
    keys_checked: int = 0
    lost_acknowledged: int = 0  # acknowledged durable writes lost
    lost_acked_nondurable: int = 0
    wrong_bytes: int = 0
    crashes: int = 0  # failed clean reopens or unexpected exceptions
    violations: list[str] = field(default_factory=list)


def _short(state) -> str:
    return state.hex()[:12] if isinstance(state, bytes) else str(state)


def _value(rng: random.Random, big: bool = False) -> bytes:
    if big:
        return rng.randbytes(rng.choice((BUFFER_SIZE + 1, 3 * BUFFER_SIZE - 100)))
    return rng.randbytes(rng.choice((0, 1, 100, 4095, 4096, 4097, 9000, rng.randrange(0, 20000))))


class _Run:
    def __init__(self, seed: int, mode: str, n: int, path: str, engine: str):
        self.rng = random.Random(seed)
        self.res = RunResult(seed, mode, n)
        self.path = path
        self.engine = engine
        self.shared = {"ops": 0, "target": n, "fired": None, "fired_at": "", "injected": 0, "step": ""}
        self.model = _Model()
        self.store: BlobStore | None = None
        self.keys = [b"k%02d" % i for i in range(10)]
        self.lost_keys: set[bytes] = set()

    # -- helpers ---------------------------------------------------------------------

    def violation(self, msg: str) -> None:
        self.res.violations.append(f"{self.shared['step']}: {msg}")

    def wrap(self, eng):
        return CountingFaulty(eng, self.shared, self.res.mode == "sticky")

    def _opts(self):
        return dict(engine=self.engine, buffer_size=BUFFER_SIZE, buffer_count=BUFFER_COUNT,
                    checkpoint_threshold=CHECKPOINT_THRESHOLD, wrap_engine=self.wrap)

    async def _step(self, name: str, coro_fn, *, kind: str):
        """Run one step; returns (ok, result). ``kind``: write | read | ckpt | close | open | list."""
        self.shared["step"] = name
        self.res.steps += 1
        inj0 = self.shared["injected"]
        fired0 = self.shared["fired"]
        ro0 = self.store.read_only if self.store is not None and not self.store.closed else False
        try:
            r = await asyncio.wait_for(coro_fn(), STEP_TIMEOUT)
            if kind == "write" and ro0 and not name.startswith("flush"):
                self.violation("a write succeeded on a read-only store")
            return True, r
        except asyncio.TimeoutError:
            self.violation("hung (no answer within the step timeout)")
            self.res.crashes += 1
            raise _Abort()
        except Exception as exc:
            fired_now = self.shared["injected"] > inj0 or (fired0 is None and self.shared["fired"] is not None)
            dead = self.res.mode == "sticky" and self.shared["fired"] is not None
            ro = self.store is not None and not self.store.closed and self.store.read_only
            ok = False
            if isinstance(exc, ReadOnly):
                ok = kind in ("write", "ckpt") and (ro or ro0)
            elif isinstance(exc, IOFailed):
                ok = (fired_now or dead) and kind != "list" and exc.errno == _errno.EIO
                if kind == "write" and ok and not ro:
                    self.violation(f"{exc!r} from a write, but the store did not turn read-only")
            elif isinstance(exc, Corrupt):
                # both checkpoints unreadable (a dead disk) is reported as Corrupt by the open
                ok = kind == "open" and (fired_now or dead)
            elif isinstance(exc, NotFound):
                raise
            if not ok:
                self.violation(f"unexpected {type(exc).__name__}: {exc} (fault fired in this step: {fired_now}, "
                               f"read-only: {ro0}->{ro})")
                self.res.crashes += 1
                raise _Abort() from exc
            if kind == "read" and not ro0 and ro:
                self.violation(f"a failed read ({exc!r}) turned the store read-only")
            self.res.error_steps += 1
            return False, exc

    async def open(self, name: str, create: bool = False) -> bool:
        if create:
            fn = lambda: BlobStore.create(self.path, STORE_SIZE, journal_size=JOURNAL_SIZE, **self._opts())
        else:
            fn = lambda: BlobStore.open(self.path, **self._opts())
        self.store = None
        ok, r = await self._step(name, fn, kind="open")
        if ok:
            self.store = r
            await self.check_all(name + " (check)", self.model.acked)
        return ok

    async def _session_end(self) -> None:
        if self.shared.get("wfault"):
            # The failed completion is delivered when the ring is reaped; the store task that
            # awaited it (a background checkpoint, say) turns the store read-only when it next
            # runs, which may come after the step that reaped it returned. Give it that turn.
            deadline = time.monotonic() + READ_ONLY_GRACE
            while not self.store.read_only and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            if not self.store.read_only:
                self.violation(f"a failed write or fdatasync did not turn the store read-only within "
                               f"{READ_ONLY_GRACE} s")
        self.shared["wfault"] = False

    async def close(self, name: str) -> None:
        s = self.store
        await self._session_end()
        ro = s.read_only
        ok, r = await self._step(name, s.close, kind="close")
        if not s.closed:
            self.violation("close() returned but the store is not closed")
        self.shared["wfault"] = False  # a closed store's read-only state is moot
        if ok and not ro and not s.read_only:
            self.model.all_durable()
        self.store = None

    async def crash(self) -> None:
        self.shared["step"] = "abandon"
        await self._session_end()
        await self.store.abandon()
        self.store = None

    # -- workload ops ------------------------------------------------------------------

    async def put(self, key: bytes, value: bytes, sync: bool) -> None:
        i = self.model.issue(key, blake3.blake3(value).digest())
        ok, _ = await self._step(f"put {key.decode()} {len(value)}B sync={sync}",
                                 lambda: self.store.put(key, value, sync=sync), kind="write")
        if ok:
            self.model.ack(key, i, sync)

    async def put_leased(self, key: bytes, value: bytes, sync: bool) -> None:
        """The daemon's large PUT: the value received into leased fixed buffers in pieces, each
        buffer written as soon as it is full while the rest arrives (a stream), then put_leased."""
        i = self.model.issue(key, blake3.blake3(value).digest())

        ok, _ = await self._step(f"put_leased {key.decode()} {len(value)}B sync={sync}",
                                 lambda: powerloss.put_leased(self.store, key, value, sync, BUFFER_SIZE // 2 + 1),
                                 kind="write")
        if ok:
            self.model.ack(key, i, sync)

    async def give_up_leased(self, value: bytes) -> None:
        """A value received into leased buffers all but its last byte (its full buffers' writes
        issued), then given up as when its client goes away: once those writes completed, failed
        or not, its extent is free again and nothing was stored."""
        self.shared["step"] = "leased value given up"
        self.res.steps += 1
        before = self.store.stat()["free_bytes"]
        lv = self.store.lease_value(len(value))
        if lv is None:
            return
        stream = lv.writer
        lv.write(value[:-1])
        await asyncio.sleep(0)
        lv.release()
        if stream is not None:
            f = stream.wait_idle()
            if f is not None:
                await asyncio.wait_for(f, STEP_TIMEOUT)
        after = self.store.stat()["free_bytes"]
        if after < before:
            self.violation(f"a leased value given up kept {before - after} bytes of free space")

    async def delete(self, key: bytes, sync: bool) -> None:
        i = self.model.issue(key, ABSENT)
        ok, _ = await self._step(f"delete {key.decode()} sync={sync}",
                                 lambda: self.store.delete(key, sync=sync), kind="write")
        if ok:
            self.model.ack(key, i, sync)

    async def put_many(self, items: dict, sync: bool) -> None:
        idx = {k: self.model.issue(k, blake3.blake3(v).digest()) for k, v in items.items()}
        ok, _ = await self._step(f"put_many {len(items)} sync={sync}",
                                 lambda: self.store.put_many(list(items.items()), sync=sync), kind="write")
        if ok:
            for k, i in idx.items():
                self.model.ack(k, i, sync)

    async def group_commit(self, items: dict) -> None:
        """Concurrent sync puts (one group commit); each may fail on its own."""
        idx = {k: self.model.issue(k, blake3.blake3(v).digest()) for k, v in items.items()}
        results = {}

        async def one(k, v):
            results[k] = await self._step(f"group put {k.decode()}", lambda: self.store.put(k, v, sync=True),
                                          kind="write")

        await asyncio.gather(*(one(k, v) for k, v in items.items()))
        for k, (ok, _) in results.items():
            if ok:
                self.model.ack(k, idx[k], True)

    async def flush(self) -> None:
        ok, _ = await self._step("flush", self.store.flush, kind="write")
        if ok and not self.store.read_only:
            self.model.all_durable()

    async def checkpoint(self) -> None:
        ok, _ = await self._step("checkpoint", self.store.checkpoint, kind="ckpt")
        if ok and not self.store.read_only:
            self.model.all_durable()

    async def check_key(self, key: bytes, floor: dict, name: str) -> None:
        ok, r = await self._step(name, lambda: self._get_state(key), kind="read")
        if not ok:
            return
        self._judge(key, r, floor)

    async def _get_state(self, key: bytes):
        try:
            return blake3.blake3(await self.store.get(key)).digest()
        except NotFound:
            return ABSENT

    def _judge(self, key: bytes, got, floor: dict) -> None:
        self.res.keys_checked += 1
        if got in self.model.allowed(key, floor):
            return
        ops = self.model.ops.get(key, [])
        d = self.model.durable.get(key, -1)
        a = self.model.acked.get(key, -1)
        if got == ABSENT or got in ops:
            if d >= 0 and got not in ops[d:]:
                if key not in self.lost_keys:  # one lost write counts once, however often it is seen
                    self.lost_keys.add(key)
                    self.res.lost_acknowledged += 1
                self.violation(f"{key!r}: an acknowledged durable write is lost (got {_short(got)})")
            elif a >= 0 and got not in ops[a:]:
                if key not in self.lost_keys:
                    self.lost_keys.add(key)
                    self.res.lost_acked_nondurable += 1
                self.violation(f"{key!r}: an acknowledged write is lost without a power cut (got {_short(got)})")
            else:
                self.violation(f"{key!r}: got {_short(got)}, not an allowed state")
        else:
            self.res.wrong_bytes += 1
            self.violation(f"{key!r}: returned bytes never put for the key ({_short(got)})")

    async def check_all(self, name: str, floor: dict) -> None:
        for key in self.keys:
            await self.check_key(key, floor, f"{name} get {key.decode()}")

    async def list_keys(self) -> None:
        async def lst():
            return [k async for k in self.store.list()]

        ok, keys = await self._step("list", lst, kind="list")
        if ok:
            for k in keys:
                if k not in self.model.ops:
                    self.violation(f"list() returned {k!r}, never put")

    # -- the script ----------------------------------------------------------------------

    async def script(self) -> None:
        rng, K = self.rng, self.keys
        if not await self.open("create", create=True):
            return
        await self.put(K[0], _value(rng), sync=True)
        await self.close("close after format")
        if not await self.open("reopen"):
            return
        await self.put(K[1], _value(rng), sync=False)
        await self.put(K[2], _value(rng), sync=True)
        await self.put(K[3], _value(rng, big=True), sync=rng.random() < 0.5)  # streamed before its record
        await self.put_leased(K[2], _value(rng, big=True), sync=True)  # written as it arrives
        await self.give_up_leased(_value(rng, big=True))
        await self.delete(K[0], sync=False)
        await self.put_many({K[4]: _value(rng), K[5]: _value(rng), K[6]: _value(rng)}, sync=True)
        await self.put_many({K[7]: _value(rng), K[1]: _value(rng)}, sync=False)
        await self.flush()
        await self.check_key(K[4], self.model.acked, "get k04")
        await self.list_keys()
        await self.put(K[0], _value(rng), sync=False)  # so the checkpoint has something to write
        await self.checkpoint()
        await self.group_commit({K[8]: _value(rng), K[9]: _value(rng), K[2]: _value(rng)})
        for _ in range(6):  # enough journal to pass the checkpoint threshold once
            await self.put(rng.choice(K), _value(rng), sync=rng.random() < 0.3)
        await self.delete(K[5], sync=True)
        await self.put(K[6], _value(rng), sync=False)
        await self.flush()  # durable, but no batch after it names it: recovery verifies these records
        await self.crash()
        if not await self.open("recover after crash"):
            return
        await self.put(K[7], _value(rng), sync=False)
        await self.delete(K[8], sync=False)
        await self.check_all("in session", self.model.acked)
        await self.close("final close")

    async def run(self) -> RunResult:
        try:
            await self.script()
        except _Abort:
            pass
        finally:
            if self.store is not None and not self.store.closed:
                await self.store.abandon()
        res = self.res
        res.fired = self.shared["fired"]
        res.fired_at = self.shared["fired_at"]
        res.injected = self.shared["injected"]
        if res.fired is None and res.n <= self.shared["ops"]:
            self.violation(f"op {res.n} of {self.shared['ops']} was not failed")
        await self.verify()
        return res

    async def verify(self) -> None:
        """Reopen without faults: it opens, holds every acknowledged write, takes a new one."""
        self.shared["step"] = "clean reopen"
        try:
            store = await asyncio.wait_for(BlobStore.open(self.path, engine=self.engine, create_size=STORE_SIZE,
                                                          journal_size=JOURNAL_SIZE), STEP_TIMEOUT)
        except Exception as exc:
            self.res.crashes += 1
            self.violation(f"the store does not reopen without faults: {exc!r}")
            return
        self.store = store
        try:
            listed = {k async for k in store.list()}
            for key in self.keys:
                try:
                    got = await self._get_state(key)
                except Exception as exc:
                    self.violation(f"{key!r}: get failed after a clean reopen: {exc!r}")
                    self.res.crashes += 1
                    continue
                self._judge(key, got, self.model.acked)
                if (got != ABSENT) != (key in listed):
                    self.violation(f"{key!r}: list() and get() disagree")
            await store.put(b"after", b"x" * 5000, sync=True)
            if await store.get(b"after") != b"x" * 5000:
                self.violation("the reopened store does not read back a new write")
            if store.read_only:
                self.violation("the store reopened read-only")
        except Exception as exc:
            self.res.crashes += 1
            self.violation(f"the reopened store failed: {exc!r}")
        finally:
            await store.close()
            self.store = None


class _Abort(Exception):
    pass


async def _one(seed: int, mode: str, n: int, workdir: str, engine: str) -> RunResult:
    path = os.path.join(workdir, f"io-{seed}-{mode}-{n}.data")
    if os.path.exists(path):
        os.unlink(path)
    try:
        return await _Run(seed, mode, n, path, engine).run()
    finally:
        if os.path.exists(path):
            os.unlink(path)


def run_loop(seed: int, mode: str, *, engine: str = "uring", workdir: str | None = None,
             first: int = 1, max_n: int = 100000, step: int = 1) -> list[RunResult]:
    """Run the workload of ``seed`` with op N failed, for N = first, first+step, ... until a run
    in which no fault fired (or ``max_n``). ``mode``: ``"single"`` or ``"sticky"``."""
    own = workdir is None
    if own:
        workdir = os.path.join(REPO, ".test-tmp", f"ioerrors-{os.getpid()}")
    os.makedirs(workdir, exist_ok=True)
    out = []
    try:
        n = first
        while n <= max_n:
            r = asyncio.run(_one(seed, mode, n, workdir, engine))
            out.append(r)
            if r.fired is None:
                break
            n += step
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return out


def serve_faulty(data: str, sock: str, size: int = 16 << 20) -> int:
    """Serve a store whose disk can be made to fail: the real server (``run_server``) over the real
    store, opened with ``wrap_engine`` = :class:`FaultyEngine`. For the daemon-level I/O-error test.

    SIGUSR1 arms the fault: the next fdatasync fails with EIO. Prints one line
    ``READY <metrics host:port>`` once serving; SIGTERM stops it (exit status 0).
    """
    import signal

    from ringblob.metrics import Metrics
    from ringblob.server import ServerConfig, run_server

    async def amain() -> int:
        holder = {}

        def wrap(e):
            holder["e"] = FaultyEngine(e)
            return holder["e"]

        metrics = Metrics()
        store = await BlobStore.open(data, create_size=size, observer=metrics, wrap_engine=wrap)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, lambda: holder["e"].fail_next("fdatasync"))
        cfg = ServerConfig(socket_path=sock, metrics_addr="127.0.0.1:0", socket_activation=False)

        def ready(srv):
            host, port = srv.metrics_address
            print(f"READY {host}:{port}", flush=True)

        return await run_server(store, cfg, metrics=metrics, on_ready=ready)

    return asyncio.run(amain())


def figures(results: list[RunResult], seconds: float) -> dict:
    fired = [r for r in results if r.fired]
    return {
        "suite": "I/O-error loop",
        "count": sum(1 for r in fired),
        "unit": "I/O faults injected",
        "acknowledged_lost": sum(r.lost_acknowledged for r in results),
        "wrong_bytes": sum(r.wrong_bytes for r in results),
        "crashes": sum(r.crashes for r in results),
        "seconds": round(seconds, 1),
        "failed_completions": sum(r.injected for r in results),
        "by_kind": {k: sum(1 for r in fired if r.fired == k) for k in ("read", "write", "fdatasync")},
        "acked_nondurable_lost": sum(r.lost_acked_nondurable for r in results),
        "failed_runs": sum(1 for r in results if r.violations),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="ringblob I/O-error loop: fail engine op N for N = 1, 2, ...")
    ap.add_argument("--seeds", type=int, default=8, help="seeded workloads (default 8), each looped in both modes")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, help="just this workload seed")
    ap.add_argument("--mode", choices=("single", "sticky", "both"), default="both")
    ap.add_argument("--n", type=int, help="just this N (reproduce one run)")
    ap.add_argument("--engine", default="uring", help="engine under the fault injector (uring or psync)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if not args.verbose:  # the store logs every injected failure; the summary says what matters
        logging.getLogger("ringblob").setLevel(logging.CRITICAL)
    seeds = [args.seed] if args.seed is not None else range(args.first_seed, args.first_seed + args.seeds)
    modes = ("single", "sticky") if args.mode == "both" else (args.mode,)
    t0 = time.monotonic()
    results: list[RunResult] = []
    for seed in seeds:
        for mode in modes:
            if args.n is not None:
                rs = run_loop(seed, mode, engine=args.engine, first=args.n, max_n=args.n)
            else:
                rs = run_loop(seed, mode, engine=args.engine)
            results.extend(rs)
            if args.verbose:
                print(f"seed {seed} {mode}: {len(rs)} runs, {sum(1 for r in rs if r.violations)} failed")
    bad = [r for r in results if r.violations]
    for r in bad[:50]:
        print(f"seed {r.seed} mode {r.mode} N {r.n} ({r.fired} in {r.fired_at}): " + "; ".join(r.violations[:4]))
    print("FIGURES " + json.dumps(figures(results, time.monotonic() - t0)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
