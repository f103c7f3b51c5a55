"""Power-loss rounds: a seeded store workload, a power cut, torn writes, recovery, checks.

One round (all of it decided by its seed, so a failing seed reproduces exactly):

1. format a small store (small journal and checkpoint threshold, so rounds
   cross checkpoints and journal wrap);
2. reopen it with :class:`ringblob.engine.crashsim.CrashRecorder` in
   deterministic mode, cutting the power after a seeded number of engine ops
   (``sync_method`` "dsync" for even seeds, "fdatasync" for odd ones; 32 KiB
   fixed buffers, so larger values are written ahead of their round);
3. run a seeded workload of puts (half the values over one buffer received
   into leased buffers and written as they arrive, as the daemon's large PUT),
   deletes, put_many, flushes and checkpoints from several concurrent tasks (each task owns its keys, so each key's
   operations are ordered) until the cut; abandon the store as a crash would;
4. :func:`simulate_power_loss`: undo every write not covered by a completed
   fdatasync (nor completed with RWF_DSYNC), re-apply a seeded subset with 4 KiB sectors written, dropped
   or garbage;
5. in a quarter of the rounds, cut the power a second time while the store
   recovers from the first cut (a seeded op of the recovery, or right after
   it), and tear that recovery's unsynced writes too;
6. reopen (the store must open) and check, for every key, that what it
   returns is allowed: the state of its last operation known durable (a
   ``sync=True`` op that returned, or any op that returned before a
   ``flush()`` that returned), or the state of an operation issued after
   that one. ``Corrupt`` is never allowed (a record whose data may not have
   reached the medium must not be served), nor bytes that were never put for
   the key; ``list()`` must agree with ``get``; the store must take new writes.

Run directly for the torture figures: ``python tests/powerloss.py --rounds 2000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

import blake3

from ringblob.engine.crashsim import CrashRecorder, simulate_power_loss
from ringblob.errors import NotFound
from ringblob.store import BlobStore
from ringblob.store.blobstore import SYNC_METHODS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSENT = "absent"

STORE_SIZE = 8 << 20
JOURNAL_SIZE = 1 << 20
CHECKPOINT_THRESHOLD = 96 << 10
TASKS = 3
BUFFER_SIZE = 32 << 10
KEYS_PER_TASK = 6


@dataclass
class RoundResult:
    """Outcome of one round; ``violations`` empty means the invariants held."""

    seed: int
    ops_before_cut: int = 0
    acked_durable: int = 0
    unsynced_writes: int = 0
    torn_sectors: int = 0
    keys_checked: int = 0
    lost_acknowledged: int = 0
    wrong_bytes: int = 0
    open_failed: int = 0
    recovery_cuts: int = 0
    violations: list[str] = field(default_factory=list)


class _Model:
    """Per key: the ops issued in order, and the index of the last one known durable."""

    def __init__(self):
        self.ops: dict[bytes, list] = {}  # key -> [state, ...] (state: bytes digest or ABSENT)
        self.durable: dict[bytes, int] = {}  # key -> index into ops
        self.acked: dict[bytes, int] = {}  # key -> index of the last op that returned

    def issue(self, key: bytes, state) -> int:
        self.ops.setdefault(key, []).append(state)
        return len(self.ops[key]) - 1

    def ack(self, key: bytes, i: int, durable: bool) -> None:
        self.acked[key] = max(self.acked.get(key, -1), i)
        if durable:
            self.durable[key] = max(self.durable.get(key, -1), i)

    def flushed(self, acked_snapshot: dict[bytes, int]) -> None:
        for key, i in acked_snapshot.items():
            self.durable[key] = max(self.durable.get(key, -1), i)

    def allowed(self, key: bytes) -> set:
        ops = self.ops.get(key, [])
        d = self.durable.get(key, -1)
        states = set(ops[d:]) if d >= 0 else set(ops) | {ABSENT}
        return states


def _value(rng: random.Random) -> bytes:
    size = rng.choice((0, 1, 100, 4095, 4096, 4097, 9000, rng.randrange(0, 40000), 2 * BUFFER_SIZE + 100))
    return rng.randbytes(size)


async def put_leased(store: BlobStore, key: bytes, value: bytes, sync: bool, piece: int) -> None:
    """The daemon's large PUT: ``value`` received into leased fixed buffers in pieces of
    ``piece`` bytes (socket reads), each buffer written as soon as it is full while the rest
    arrives, then put_leased; put() when none is leased (the store not writable, the pool short).
    Also the I/O-error loop's (tests/ioerrors.py)."""
    lv = store.lease_value(len(value))
    if lv is None:
        await store.put(key, value, sync=sync)
        return
    try:
        for pos in range(0, len(value), piece):
            lv.write(value[pos : pos + piece])
            await asyncio.sleep(0)  # the turn's submit: the full buffers' writes go out
    except BaseException:
        lv.release()
        raise
    await store.put_leased(key, lv, sync=sync)


async def _task(store: BlobStore, model: _Model, rng: random.Random, tid: int, nops: int) -> None:
    keys = [f"t{tid}-k{i}".encode() for i in range(KEYS_PER_TASK)]
    for _ in range(nops):
        r = rng.random()
        key = rng.choice(keys)
        sync = rng.random() < 0.25
        if r < 0.55:
            value = _value(rng)
            i = model.issue(key, blake3.blake3(value).digest())
            if len(value) > BUFFER_SIZE and rng.random() < 0.5:
                await put_leased(store, key, value, sync, BUFFER_SIZE // 2 + 1)
            else:
                await store.put(key, value, sync=sync)
            model.ack(key, i, sync)
        elif r < 0.70:
            i = model.issue(key, ABSENT)
            await store.delete(key, sync=sync)
            model.ack(key, i, sync)
        elif r < 0.82:
            batch = {k: _value(rng) for k in rng.sample(keys, rng.randint(1, 3))}
            idx = {k: model.issue(k, blake3.blake3(v).digest()) for k, v in batch.items()}
            await store.put_many(list(batch.items()), sync=sync)
            for k, i in idx.items():
                model.ack(k, i, sync)
        elif r < 0.94:
            snapshot = dict(model.acked)
            await store.flush()
            model.flushed(snapshot)
        else:
            await store.checkpoint()


async def _run_round(seed: int, workdir: str, engine: str) -> RoundResult:
    rng = random.Random(seed)
    res = RoundResult(seed)
    path = os.path.join(workdir, f"r{seed}.data")
    log = os.path.join(workdir, f"r{seed}.log")
    for p in (path, log):
        if os.path.exists(p):
            os.unlink(p)
    store = await BlobStore.create(path, STORE_SIZE, journal_size=JOURNAL_SIZE, engine=engine)
    await store.close()

    cut = asyncio.Event()
    recorder: dict = {}

    def wrap(eng):
        recorder["r"] = CrashRecorder(eng, path, log, deterministic=True, on_crash=cut.set)
        return recorder["r"]

    model = _Model()
    # both ways of making a round durable, by seed: even seeds RWF_DSYNC writes (where the store
    # may), odd seeds an fdatasync after the writes; 32 KiB fixed buffers, so values above that
    # are written ahead of their round (as the daemon's large PUTs are) and such a round must
    # end with an fdatasync even under dsync
    store = await BlobStore.open(path, engine=engine, wrap_engine=wrap, checkpoint_threshold=CHECKPOINT_THRESHOLD,
                                 sync_method=SYNC_METHODS[seed % 2], buffer_size=BUFFER_SIZE)
    rec = recorder["r"]
    rec.crash_after = rec.ops + rng.randint(1, 600)  # the cut falls inside the workload
    tasks = [asyncio.ensure_future(_task(store, model, random.Random(rng.random()), t, 60)) for t in range(TASKS)]
    cut_waiter = asyncio.ensure_future(cut.wait())
    workload = asyncio.gather(*tasks)
    await asyncio.wait([workload, cut_waiter], return_when=asyncio.FIRST_COMPLETED)
    if workload.done():
        workload.result()  # a workload error before the cut is a bug in the store: raise it
    for t in tasks:
        t.cancel()
    cut_waiter.cancel()
    await asyncio.gather(workload, cut_waiter, return_exceptions=True)
    res.ops_before_cut = rec.ops
    await store.abandon()
    res.acked_durable = len(model.durable)

    out = simulate_power_loss(path, log, seed)
    res.unsynced_writes = out.unsynced_writes
    res.torn_sectors = out.dropped_sectors + out.garbage_sectors

    if rng.random() < 0.25:
        # a second power cut while the store recovers from the first one
        os.unlink(log)
        cut.clear()
        recorder.clear()
        opening = asyncio.ensure_future(BlobStore.open(
            path, engine=engine, checkpoint_threshold=CHECKPOINT_THRESHOLD,
            wrap_engine=lambda eng: recorder.setdefault(
                "r", CrashRecorder(eng, path, log, deterministic=True, crash_after=rng.randint(1, 40),
                                   on_crash=cut.set))))
        cut_waiter = asyncio.ensure_future(cut.wait())
        await asyncio.wait([opening, cut_waiter], return_when=asyncio.FIRST_COMPLETED)
        cut_waiter.cancel()
        if opening.done():
            try:
                recovered = opening.result()
            except Exception as exc:
                res.open_failed = 1
                res.violations.append(f"recovery after the first cut failed: {exc!r}")
                return res
            await recovered.abandon()  # recovery finished before the cut: crash right after it
        else:
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
        res.recovery_cuts = 1
        out = simulate_power_loss(path, log, seed + 1_000_003)
        res.unsynced_writes += out.unsynced_writes
        res.torn_sectors += out.dropped_sectors + out.garbage_sectors

    try:
        store = await BlobStore.open(path, engine=engine)
    except Exception as exc:  # the store must always open after a power cut
        res.open_failed = 1
        res.violations.append(f"reopen failed: {exc!r}")
        return res
    try:
        listed = set()
        async for k in store.list():
            listed.add(k)
        for key in model.ops:
            res.keys_checked += 1
            allowed = model.allowed(key)
            try:
                got = blake3.blake3(await store.get(key)).digest()
            except NotFound:
                got = ABSENT
            except Exception as exc:
                got = f"error {exc!r}"
            if got not in allowed:
                d = model.durable.get(key, -1)
                if isinstance(got, bytes) and got in model.ops[key][:max(d, 0)] or got == ABSENT:
                    res.lost_acknowledged += 1
                    res.violations.append(f"{key!r}: an acknowledged durable write is lost (got {_short(got)})")
                else:
                    res.wrong_bytes += 1
                    res.violations.append(f"{key!r}: returned {_short(got)}, never a durable-or-later state")
            if (got != ABSENT) != (key in listed) and not str(got).startswith("error"):
                res.violations.append(f"{key!r}: list() and get() disagree")
        await store.put(b"after-recovery", b"x" * 5000, sync=True)
        if await store.get(b"after-recovery") != b"x" * 5000:
            res.violations.append("the recovered store does not read back a new write")
    finally:
        await store.close()
    for p in (path, log):
        os.unlink(p)
    return res


def _short(state) -> str:
    return state.hex()[:12] if isinstance(state, bytes) else str(state)


def run_rounds(seeds, *, engine: str = "psync", workdir: str | None = None) -> list[RoundResult]:
    """Run one power-loss round per seed on the ext4 file system under the repo."""
    own = workdir is None
    if own:
        workdir = os.path.join(REPO, ".test-tmp", f"powerloss-{os.getpid()}")
    os.makedirs(workdir, exist_ok=True)
    try:
        return [asyncio.run(_run_round(seed, workdir, engine)) for seed in seeds]
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="ringblob power-loss simulation rounds")
    ap.add_argument("--rounds", type=int, default=2000, help="number of seeded rounds (default 2000)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, help="run just this seed (reproduce a failure)")
    ap.add_argument("--engine", default="psync", help="engine for format and verification opens")
    args = ap.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.first_seed, args.first_seed + args.rounds)
    t0 = time.monotonic()
    results = run_rounds(seeds, engine=args.engine)
    bad = [r for r in results if r.violations]
    for r in bad:
        print(f"seed {r.seed}: " + "; ".join(r.violations[:5]))
    figures = {
        "suite": "power-loss simulation",
        "count": len(results),
        "unit": "crash rounds",
        "acknowledged_lost": sum(r.lost_acknowledged for r in results),
        "wrong_bytes": sum(r.wrong_bytes for r in results),
        "crashes": sum(r.open_failed for r in results),
        "seconds": round(time.monotonic() - t0, 1),
        "second_cuts_during_recovery": sum(r.recovery_cuts for r in results),
        "torn_sectors": sum(r.torn_sectors for r in results),
    }
    print("FIGURES " + json.dumps(figures))
    print(
        f"powerloss: rounds={len(results)} ops_before_cut={sum(r.ops_before_cut for r in results)} "
        f"unsynced_writes={sum(r.unsynced_writes for r in results)} torn_sectors={sum(r.torn_sectors for r in results)} "
        f"keys_checked={sum(r.keys_checked for r in results)} "
        f"lost_acknowledged={sum(r.lost_acknowledged for r in results)} wrong_bytes={sum(r.wrong_bytes for r in results)} "
        f"open_failed={sum(r.open_failed for r in results)} recovery_cuts={sum(r.recovery_cuts for r in results)} "
        f"failed_rounds={len(bad)} "
        f"seconds={time.monotonic() - t0:.1f}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
