#!/usr/bin/env python3
"""Durable group commits on a file with no daemon around them: what the disk allows a sync PUT.

A ``sync=True`` put may be acknowledged only once an fdatasync that began
after its write completed has succeeded (docs/FORMAT.md, "Durability").
This measures how many such acknowledged 4 KiB writes per second the device
and the ring give at ``--conc`` writes in flight when nothing else costs
anything: no socket, no client, no hashing, no index, no Python per value —
only the I/O of group-commit rounds, issued through ringblob's engine
(``AsyncEngine``: io_uring, fixed buffers, O_DIRECT) from one event loop.

``--conc`` slots each hold one 4 KiB value; a slot whose value was
acknowledged has its next value ready at once (a client with no latency).
A round takes up to ``ceil(conc / rounds)`` ready values and writes them
as **one merged write** at a sequential cursor (one op per 256 KiB fixed
buffer it spans) (the store's write cursor
gives a round's values neighbouring pages, so they merge); in the
``journal`` shape a 4 KiB journal write goes out beside it, unlinked, as
in ``BlobStore._commit_items``. Once the round's writes completed and the
previous round's fdatasync succeeded, the round's fdatasync goes out; when
it completes the round's values are acknowledged. Up to ``--rounds``
rounds are in flight (the store keeps two: one round's writes overlap the
previous round's fdatasync).

Shapes measured (each ``--duration`` seconds, in this order):

* ``journal``, 2 rounds in flight — the I/O pattern of ringblob's rounds —
  and 1 (each round's writes wait for the previous round's fdatasync: with
  clients that answer at once, rounds of every value in flight);
* ``minimal``, 1, 2 and 4 rounds in flight — one merged write then the
  fdatasync: the least I/O any store that keeps the promise above does;
* ``minimal-dsync``, 2 and 4 rounds in flight — the merged write carries
  RWF_DSYNC (durable when it completes: on a device with a volatile write
  cache and no FUA the kernel flushes the cache after it) and no fdatasync
  follows, so rounds need no order among them (ringblob's ``sync_method =
  "dsync"`` without the journal write).

The best of these is an estimate (not a proof) of the ceiling for a sync PUT
at this concurrency on this device, set beside fio in bench/run.py: fio's
``--fdatasync=32`` job does not hold its writes for the flush (its
fdatasync goes out beside the writes in flight), so it can run above this
ceiling, and a target stated as a fraction of it can lie above it too.

Output: one JSON object on stdout: ``{"results": [row, ...], "best": row}``,
each row with ``shape``, ``rounds_in_flight``, ``ops_per_s`` (values
acknowledged per second), ``rounds_per_s``, ``p50_us`` / ``p99_us`` (a
value's wait from ready to acknowledged), ``cpu_s`` (this process, user +
system) and ``duration_s``.

Usage::

    .venv/bin/python bench/groupcommit.py --file .bench-tmp/fio.dat --conc 32 --duration 3

The file must exist, be written in full (not fallocated: an unwritten
extent makes each write a metadata change), and be at least 64 MiB; it is
overwritten. ``make bench`` runs this beside ``put_4k_sync_c32``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "daemon"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from ringblob.direct import open_direct  # noqa: E402
from ringblob.engine import open_engine  # noqa: E402
from ringblob.engine.aio import FSYNC, WRITE, AsyncEngine, check_result  # noqa: E402

from run import percentiles  # noqa: E402 (bench/run.py, beside this file)

BS = 4096
JOURNAL_PAGES = 4096  # the file's first 16 MiB take the journal writes; values go after


async def measure(aio: AsyncEngine, pages: int, conc: int, duration: float, shape: str,
                  rounds_in_flight: int) -> dict:
    """Run group-commit rounds of ``shape`` (``journal``, ``minimal`` or ``minimal-dsync``) for
    ``duration`` seconds; the row described in the module docstring.

    ``pages``: 4 KiB pages in the file (values cycle over pages ``JOURNAL_PAGES`` to ``pages - 1``).
    Raises ``OSError`` when a write or fdatasync fails or writes short.
    """
    journal = shape == "journal"
    dsync = shape == "minimal-dsync"
    per_round = -(-conc // rounds_in_flight)
    bsz = aio.buffer_size
    bufs = await aio.lease(-(-per_round * BS // bsz) + 1)  # a round's values, then the journal's
    for b in bufs:
        b.view[:] = os.urandom(len(b.view))
    data_bufs, jbuf = bufs[:-1], bufs[-1]
    ready: collections.deque[float] = collections.deque(time.perf_counter() for _ in range(conc))
    wake = asyncio.Event()
    wake.set()
    inflight: collections.deque[asyncio.Future] = collections.deque()
    waits: list[float] = []
    state = {"cursor": JOURNAL_PAGES, "jpos": 0, "acked": 0, "rounds": 0}
    t_meas = time.perf_counter()
    t_end = t_meas + duration

    def check(res: list, ops: list) -> None:
        for r, op in zip(res, ops):  # a failed op's OSError, or EIO for a short write
            check_result(r, op[3] if op[0] == WRITE else 0, f"groupcommit {op[0]}")

    async def one_round(born: list[float], prev: asyncio.Future | None) -> None:
        n = len(born)
        if state["cursor"] + n > pages:
            state["cursor"] = JOURNAL_PAGES
        # the merged write, one op per fixed buffer it spans (adjacent: the block layer merges them)
        off, left = state["cursor"] * BS, n * BS
        ops = []
        for b in data_bufs:
            if left <= 0:
                break
            k = min(left, bsz)
            ops.append((WRITE, b, off, k, 0))
            off += k
            left -= k
        state["cursor"] += n
        if journal:
            ops.append((WRITE, jbuf, (state["jpos"] % JOURNAL_PAGES) * BS, BS, 0))
            state["jpos"] += 1
        check(await aio.run(ops, link=False, dsync=dsync), ops)
        if not dsync:  # (a RWF_DSYNC write is durable when it completes)
            if prev is not None:
                await prev  # fdatasyncs in order: a round is acknowledged after the one before it
            sync = [(FSYNC,)]
            check(await aio.run(sync), sync)
        now = time.perf_counter()
        for t in born:
            if t >= t_meas and now <= t_end:
                waits.append(now - t)
        if now <= t_end:
            state["acked"] += n
            state["rounds"] += 1
        ready.extend([now] * n)
        wake.set()

    cpu0 = time.process_time()
    prev: asyncio.Future | None = None
    try:
        while time.perf_counter() < t_end:
            await wake.wait()
            wake.clear()
            while inflight and inflight[0].done():
                inflight.popleft().result()
            if not ready:
                continue
            while len(inflight) >= rounds_in_flight:
                await inflight[0]
                inflight.popleft().result()
            born = [ready.popleft() for _ in range(min(per_round, len(ready)))]
            if ready:
                wake.set()
            prev = asyncio.ensure_future(one_round(born, prev))
            inflight.append(prev)
        for f in inflight:
            await f
    finally:
        for f in inflight:
            if not f.done():
                f.cancel()
        aio.release(*bufs)
    cpu = time.process_time() - cpu0
    lat = percentiles(waits)  # the same percentiles as every row of bench/run.py's report
    return {
        "shape": shape,
        "rounds_in_flight": rounds_in_flight,
        "concurrency": conc,
        "ops_per_s": state["acked"] / duration,
        "rounds_per_s": state["rounds"] / duration,
        "values_per_round": state["acked"] / state["rounds"] if state["rounds"] else 0.0,
        "p50_us": lat.get("p50_us", 0.0),
        "p99_us": lat.get("p99_us", 0.0),
        "cpu_s": cpu,
        "duration_s": duration,
    }


#: (shape, rounds in flight), measured in this order
SHAPES = (("journal", 2), ("journal", 1), ("minimal", 1), ("minimal", 2), ("minimal", 4),
          ("minimal-dsync", 2), ("minimal-dsync", 4))


async def run(path: str, conc: int, duration: float, warmup: float) -> dict:
    """Every shape of :data:`SHAPES` on ``path``; ``{"results": rows, "best": row}``."""
    df = open_direct(path)
    try:
        pages = df.size // BS
        if pages < 4 * JOURNAL_PAGES:
            raise SystemExit(f"groupcommit: {path} has {df.size} bytes; it needs at least {4 * JOURNAL_PAGES * BS}")
        eng = open_engine("uring", [df.fd], block_size=df.block_size, buffer_size=256 * 1024, buffer_count=16,
                          queue_depth=64)
        aio = AsyncEngine(eng)
        try:
            rows = []
            for shape, r in SHAPES:
                if warmup > 0:
                    await measure(aio, pages, conc, warmup, shape, r)
                rows.append(await measure(aio, pages, conc, duration, shape, r))
        finally:
            aio.close()  # closes the engine too
    finally:
        df.close()
    return {"results": rows, "best": max(rows, key=lambda x: x["ops_per_s"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", required=True, help="a fully written file of at least 64 MiB (overwritten)")
    ap.add_argument("--conc", type=int, default=32, help="values in flight (default 32)")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds measured per shape (default 3)")
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds run before each shape (default 0.5)")
    args = ap.parse_args(argv)
    if args.conc < 1 or args.duration <= 0:
        ap.error("--conc must be at least 1 and --duration positive")
    try:
        import uvloop  # the daemon's loop where installed
        uvloop.install()
    except ImportError:
        pass
    doc = asyncio.run(run(args.file, args.conc, args.duration, args.warmup))
    json.dump(doc, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
