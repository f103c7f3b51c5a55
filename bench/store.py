#!/usr/bin/env python3
"""The blob store in-process: index RAM per blob, recovery time, put/get rates vs the raw engine.

Not a test. Writes ``bench/results/store.md`` (and ``store.json``).

* **Index RAM**: bytes per blob beyond the key bytes, with N blobs (default
  1M, 16-byte keys) — measured two ways: tracemalloc around loading the
  index (as recovery does) at 200k blobs, and ``sys.getsizeof`` of the index
  (its arena, hash table and order as allocated) at N. Target <= 100.
* **Recovery**: open time of a store holding N blobs after a clean close
  (checkpoint read + index load + allocator), and after a crash with a
  journal tail to replay. Target < 3 s at 1M.
* **Rates**: 4 KiB put (``sync=False``; ``sync=True`` with 64 concurrent
  writers, i.e. group commit) and get at concurrency 64 through
  :class:`BlobStore`, against the raw rate of 4 KiB writes / reads through
  :class:`AsyncEngine` on the same file and engine (``uring`` and ``psync``).

Data lives under ``.bench-tmp/`` (ext4, O_DIRECT). Usage::

    .venv/bin/python bench/store.py              # N = 1,000,000
    .venv/bin/python bench/store.py --n 200000 --seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import sys
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "daemon"))

from ringblob.direct import open_direct  # noqa: E402
from ringblob.engine import open_engine  # noqa: E402
from ringblob.engine.aio import AsyncEngine  # noqa: E402
from ringblob.store import BlobStore  # noqa: E402
from ringblob.store.index import Index, pack_value  # noqa: E402

MIB = 1 << 20
TMP = os.path.join(ROOT, ".bench-tmp", "store")


def engines() -> list[str]:
    try:
        from ringblob._uring import Ring  # noqa: F401

        return ["uring", "psync"]
    except ImportError:
        return ["psync"]


def index_sizeof(ix: Index) -> int:
    return sys.getsizeof(ix)  # the arena, hash table and order as allocated (Index.__sizeof__)


def tracemalloc_index(n: int, klen: int = 16) -> float:
    keys = sorted({os.urandom(klen) for _ in range(n)})
    d = b"d" * 32
    blob = b"".join(bytes([klen]) + k + pack_value(i + 100, 4096, d) for i, k in enumerate(keys))
    gc.collect()
    tracemalloc.start()
    s0 = tracemalloc.get_traced_memory()[0]
    ix = Index()
    ix.load_entries(blob, len(keys))
    gc.collect()
    s1 = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del ix
    return (s1 - s0) / len(keys) - klen


async def fill_store(path: str, n: int, page: int) -> dict:
    size = n * page + 64 * MIB + n * 512  # data pages + journal + two checkpoints + the checkpoint reserve
    t0 = time.perf_counter()
    s = await BlobStore.create(path, size, page_size=page, journal_size=32 * MIB, engine="auto",
                               checkpoint_threshold=64 * MIB)
    batch = 2000
    for i in range(0, n, batch):
        await s.put_many([(b"%016d" % j, b"v%015d" % j) for j in range(i, min(n, i + batch))])
    fill_s = time.perf_counter() - t0
    ix = s._index
    st = s.stat()
    out = {"fill_seconds": fill_s, "fill_rate": n / fill_s, "blobs": st["blob_count"],
           "index_sizeof_per_blob": index_sizeof(ix) / n - 16, "checkpoints_during_fill": st["checkpoints"]}
    t0 = time.perf_counter()
    await s.close()
    out["close_checkpoint_seconds"] = time.perf_counter() - t0
    return out


async def reopen(path: str, crash_tail: int) -> dict:
    t0 = time.perf_counter()
    s = await BlobStore.open(path, engine="auto")
    clean = time.perf_counter() - t0
    n = s.stat()["blob_count"]
    for j in range(crash_tail):
        await s.put(b"tail%08d" % j, b"x" * 100, sync=(j % 100 == 99))
    await s.abandon()
    t0 = time.perf_counter()
    s = await BlobStore.open(path, engine="auto", checkpoint_threshold=1 << 40)
    crash = time.perf_counter() - t0
    st = s.stat()
    await s.abandon()
    return {"blobs": n, "recovery_clean_seconds": clean, "recovery_crash_seconds": crash,
            "replayed_records": st["recovered_records"], "engine": st["engine"]}


async def raw_rates(path: str, kind: str, seconds: float, conc: int) -> dict:
    df = open_direct(path)
    aio = AsyncEngine(open_engine(kind, [df.fd], block_size=df.block_size))
    out = {}
    for op in ("write", "read"):
        done = 0
        stop = time.perf_counter() + seconds

        async def worker(w):
            nonlocal done
            (b,) = await aio.lease(1)
            try:
                i = w
                while time.perf_counter() < stop:
                    off = (i % 20000) * 4096
                    r = await aio.run([(op, b, off, 4096, 0)])
                    assert r[0] == 4096, r
                    done += 1
                    i += conc
            finally:
                aio.release(b)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(conc)))
        out[f"raw_{op}_4k_ops"] = done / (time.perf_counter() - t0)
    aio.close()
    df.close()
    return out


async def store_rates(path: str, kind: str, seconds: float, conc: int) -> dict:
    s = await BlobStore.create(path, 256 * MIB, engine=kind, force=True)
    val = os.urandom(4096)
    out = {}
    for name, sync in (("put_4k_nosync", False), ("put_4k_sync", True)):
        done = 0
        stop = time.perf_counter() + seconds
        f0 = s.stat()["fdatasyncs"]

        async def worker(w):
            nonlocal done
            i = w
            while time.perf_counter() < stop:
                await s.put(b"k%06d" % (i % 20000), val, sync=sync)
                done += 1
                i += conc

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(conc)))
        out[f"{name}_ops"] = done / (time.perf_counter() - t0)
        if sync:
            out["put_4k_sync_puts_per_fdatasync"] = done / max(1, s.stat()["fdatasyncs"] - f0)
    await s.flush()
    keys = [k async for k in s.list()]
    done = 0
    stop = time.perf_counter() + seconds

    async def reader(w):
        nonlocal done
        i = w
        while time.perf_counter() < stop:
            assert len(await s.get(keys[i % len(keys)])) == 4096
            done += 1
            i += conc

    t0 = time.perf_counter()
    await asyncio.gather(*(reader(w) for w in range(conc)))
    out["get_4k_ops"] = done / (time.perf_counter() - t0)
    await s.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="blobs for the RAM and recovery figures")
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of each rate measurement")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    os.makedirs(TMP, exist_ok=True)
    res: dict = {"machine": {"python": platform.python_version(), "kernel": platform.release(),
                             "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()[0]}, "n": args.n}
    try:
        print("index RAM (tracemalloc, 200k blobs) ...", flush=True)
        res["index_tracemalloc_per_blob_beyond_key"] = tracemalloc_index(min(args.n, 200_000))
        path = os.path.join(TMP, "big.rb")
        if os.path.exists(path):
            os.unlink(path)
        print(f"filling a store with {args.n} blobs ...", flush=True)
        res["fill"] = asyncio.run(fill_store(path, args.n, 512 if open_direct_bs() <= 512 else 4096))
        print("recovery ...", flush=True)
        res["recovery"] = asyncio.run(reopen(path, crash_tail=20_000))
        os.unlink(path)
        res["rates"] = {}
        for kind in engines():
            print(f"rates ({kind}) ...", flush=True)
            p = os.path.join(TMP, f"rates-{kind}.rb")
            r = asyncio.run(store_rates(p, kind, args.seconds, args.concurrency))
            r.update(asyncio.run(raw_rates(p, kind, args.seconds, args.concurrency)))
            res["rates"][kind] = r
            os.unlink(p)
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "store.json"), "w") as f:
        json.dump(res, f, indent=2)
    md = render(res, args)
    with open(os.path.join(args.out, "store.md"), "w") as f:
        f.write(md)
    print(md)


def open_direct_bs() -> int:
    p = os.path.join(TMP, "probe")
    df = open_direct(p, create_size=1 << 20)
    bs = df.block_size
    df.close()
    os.unlink(p)
    return bs


def render(res: dict, args) -> str:
    f, r = res["fill"], res["recovery"]
    ram = res["index_tracemalloc_per_blob_beyond_key"]
    lines = [
        "# Blob store benchmark (bench/store.py)",
        "",
        f"Machine: Python {res['machine']['python']}, kernel {res['machine']['kernel']}, "
        f"{res['machine']['cpus']} CPUs, shared with other work while measured (1-minute load average "
        f"{res['machine']['loadavg_at_start']:.1f} at the start; timings vary with it). "
        f"Engine for the RAM/recovery figures: {r['engine']}.",
        "",
        "| figure | value | target |",
        "| --- | --- | --- |",
        f"| index RAM per blob beyond the key bytes (tracemalloc, 200k blobs, 16-byte keys) | {ram:.1f} B | <= 100 B "
        f"{'PASS' if ram <= 100 else 'MISS'} |",
        f"| index RAM per blob beyond the key bytes (getsizeof of the index, {f['blobs']:,} blobs) | "
        f"{f['index_sizeof_per_blob']:.1f} B | <= 100 B {'PASS' if f['index_sizeof_per_blob'] <= 100 else 'MISS'} |",
        f"| recovery after a clean close, {r['blobs']:,} blobs | {r['recovery_clean_seconds']:.2f} s | < 3 s "
        f"{'PASS' if r['recovery_clean_seconds'] < 3 else 'MISS'} |",
        f"| recovery after a crash, {r['blobs']:,} blobs + {r['replayed_records']:,} journal records replayed | "
        f"{r['recovery_crash_seconds']:.2f} s | < 3 s {'PASS' if r['recovery_crash_seconds'] < 3 else 'MISS'} |",
        f"| filling {f['blobs']:,} small blobs with put_many (sync=False, batches of 2000) | "
        f"{f['fill_rate']:,.0f} blobs/s | - |",
        f"| checkpoint of {f['blobs']:,} blobs at close | {f['close_checkpoint_seconds']:.2f} s | - |",
        "",
        f"Rates: 4 KiB values, {args.concurrency} concurrent tasks in one process, {args.seconds:g} s each, "
        "ops/s. Raw = single 4 KiB write_fixed / read_fixed ops through AsyncEngine on the same file.",
        "",
        "| engine | put sync=False | put sync=True (group commit) | puts per fdatasync | get | raw write | raw read | put/raw write | get/raw read |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, x in res["rates"].items():
        lines.append(
            f"| {kind} | {x['put_4k_nosync_ops']:,.0f} | {x['put_4k_sync_ops']:,.0f} | "
            f"{x['put_4k_sync_puts_per_fdatasync']:.1f} | {x['get_4k_ops']:,.0f} | {x['raw_write_4k_ops']:,.0f} | "
            f"{x['raw_read_4k_ops']:,.0f} | {x['put_4k_nosync_ops'] / x['raw_write_4k_ops']:.2f} | "
            f"{x['get_4k_ops'] / x['raw_read_4k_ops']:.2f} |"
        )
    lines += [
        "",
        "Notes: the index (Cython, ringblob._index) holds no Python object per blob (an arena of "
        "`klen|key|page|length|blake3` entries, an open-addressing table of 8-byte slots, each a hash tag "
        "and an arena offset, and sorted chunks of 8-byte offsets), so its size is about 45 bytes of entry "
        "+ 8-16 bytes of hash slot + ~10 bytes of order per blob. Recovery after a clean "
        "close reads one checkpoint (the entries load straight into the arena) and rebuilds the hash "
        "table and the allocator in one pass each. Every get hashes the value with BLAKE3 and every put "
        "hashes it too; both run on the event loop thread.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
