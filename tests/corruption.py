"""Corruption rounds: seeded bit flips in a closed store file; detection, fallback, never a wrong byte.

One round (all of it decided by its seed, so a failing seed reproduces exactly):

1. format a small store and run a seeded sequential workload (puts of many
   sizes, sync and not, deletes, put_many, flushes, checkpoints), recording
   after every op the store's sequence number and the model (key -> BLAKE3
   digest of its value); end with a clean ``close()`` (everything in a
   checkpoint) or with ``flush()`` + ``abandon()`` (a crash: a durable journal
   tail after the last checkpoint);
2. map the file from its own structures (read-only use of
   :mod:`ringblob.store.format`): both superblock slots, both checkpoint chunk
   chains, the live journal batches from the newest slot's ``replay_pos``
   (walked by the reader's rules) and every blob's extent (page, length);
3. flip 1 to 3 seeded bits in ONE region: blob data pages (padding past a
   blob's length included), the journal (live batches mostly, anywhere
   sometimes), a superblock slot, or a checkpoint chunk;
4. reopen and check what the damage allows, and nothing more:

   * data: ``get`` raises ``Corrupt`` for exactly the blobs whose bytes
     ``[0, length)`` hold a flip, and ``scrub`` lists exactly those; flips in
     the padding go unnoticed; every other blob reads back exactly (after a
     crash a damaged blob whose record recovery had to verify may instead fall
     back to an earlier value of its key);
   * superblock: a damaged newest slot falls back to the older one (its
     checkpoint and the retained journal) with nothing lost; both slots
     damaged: the open fails with ``Corrupt``;
   * checkpoint: a damaged chunk of the newest checkpoint falls back to the
     older slot with nothing lost; both damaged: ``Corrupt`` on open;
   * journal: a flip in a live batch's header or records drops the tail from
     that batch (keys take their state as of the sequence before it; a key
     changed after that point may read ``Corrupt`` when its older extent was
     reused, never other bytes); everything before stays;

   and always: no ``get`` returns bytes other than a value put for its key,
   ``list()`` agrees with ``get``, the store takes a new write;
5. repair: rewrite the damaged blobs and a few others, delete one, close
   (checkpoint) and reopen: every key reads exactly what the damaged store
   served or was rewritten to, and scrub finds nothing (a fallback or a
   dropped tail must not leave pages in use on the allocator's free list).

Run directly for the torture figures: ``python tests/corruption.py --rounds 1000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

import blake3

from ringblob.errors import Corrupt, NotFound
from ringblob.store import BlobStore
from ringblob.store import format as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSENT = "absent"
CORRUPT = "corrupt"

STORE_SIZE = 6 << 20
JOURNAL_SIZE = 256 << 10
CHECKPOINT_THRESHOLD = 16 << 10
POOL = dict(buffer_size=64 << 10, buffer_count=16)  # a small fixed-buffer pool: quick ring setup
REGIONS = ("data", "journal", "superblock", "checkpoint")


@dataclass
class RoundResult:
    """Outcome of one round; ``violations`` empty means the invariants held."""

    seed: int
    region: str = ""
    ending: str = ""
    flips: int = 0
    damaged_blobs: int = 0  # blobs whose bytes hold a flip
    detected: int = 0  # gets that raised Corrupt
    padding_flips: int = 0  # flips that legitimately go unnoticed
    fallback: bool = False  # a superblock or checkpoint flip made recovery use the older slot
    truncated: bool = False  # a journal flip dropped the tail
    open_refused: bool = False  # both redundant copies damaged: Corrupt on open (expected)
    keys_checked: int = 0
    repaired: int = 0  # damaged blobs rewritten and read back after a reopen
    lost_acknowledged: int = 0
    wrong_bytes: int = 0
    crashes: int = 0
    violations: list[str] = field(default_factory=list)


def _value(rng: random.Random) -> bytes:
    size = rng.choice((0, 1, 100, 4095, 4096, 4097, 9000, 20000, rng.randrange(0, 30000)))
    if rng.random() < 0.03:
        size = 300_000  # larger than a fixed buffer: streamed before its record
    return rng.randbytes(size)


async def _workload(store: BlobStore, rng: random.Random, nops: int):
    """Sequential ops; returns (history per key, [(sequence, model snapshot), ...])."""
    keys = [b"key-%02d" % i for i in range(24)]
    model: dict[bytes, bytes] = {}
    history: dict[bytes, list] = {k: [ABSENT] for k in keys}
    snaps = [(store.stat()["sequence"], dict(model))]

    def setk(k, v):
        d = blake3.blake3(v).digest()
        model[k] = d
        history[k].append(d)

    for _ in range(nops):
        r = rng.random()
        sync = rng.random() < 0.3
        if r < 0.55:
            k, v = rng.choice(keys), _value(rng)
            await store.put(k, v, sync=sync)
            setk(k, v)
        elif r < 0.68:
            k = rng.choice(keys)
            await store.delete(k, sync=sync)
            if model.pop(k, None) is not None:
                history[k].append(ABSENT)
        elif r < 0.80:
            batch = {k: _value(rng) for k in rng.sample(keys, rng.randint(2, 3))}
            await store.put_many(list(batch.items()), sync=sync)
            for k, v in batch.items():
                setk(k, v)
        elif r < 0.93:
            await store.flush()
        else:
            await store.checkpoint()
        snaps.append((store.stat()["sequence"], dict(model)))
    return keys, model, history, snaps


# -- the file's map ------------------------------------------------------------------------


class FileMap:
    """Where everything lives in a closed store file (read with plain reads, decoded with
    ringblob.store.format): ``slots`` (decoded superblocks or None), ``newest``/``older``
    slot numbers, ``chunks[slot]`` = [(offset, protected_bytes, total_bytes)], ``batches`` =
    [(file offset, protected bytes, total bytes, first_seq, nrec, records, durable_seq)] live from
    the newest slot (records as :func:`ringblob.store.format.decode_records` gives them)."""

    def __init__(self, path: str):
        self.f = open(path, "rb")
        raw = self.f.read(8192)
        s0 = F.Superblock.decode(raw[:4096])
        P = s0.page_size if s0 else 4096
        self.P = P
        self.f.seek(0)
        raw = self.f.read(2 * P)
        self.slots = [F.Superblock.decode(raw[:P]), F.Superblock.decode(raw[P:])]
        valid = sorted((i for i in (0, 1) if self.slots[i]), key=lambda i: self.slots[i].generation, reverse=True)
        self.newest = valid[0]
        self.older = valid[1] if len(valid) > 1 else None
        self.chunks = {i: self._chunks(self.slots[i]) for i in valid}
        self.batches = self._batches(self.slots[self.newest])
        self.f.close()

    def _read(self, off: int, n: int) -> bytes:
        self.f.seek(off)
        return self.f.read(n)

    def _chunks(self, sb) -> list:
        out = []
        page, n = sb.ckpt_page, sb.ckpt_npages
        while page:
            h = F.decode_chunk_header(self._read(page * self.P, self.P))
            out.append((page * self.P, F.CHUNK_HEADER_SIZE + h.payload_len, n * self.P))
            page, n = h.next_page, h.next_npages
        return out

    def _batches(self, sb) -> list:
        P, J = self.P, sb.journal_pages * self.P
        joff = sb.journal_page * P
        pos, expect, prev = sb.replay_pos, sb.next_seq, sb.chain_crc
        out = []
        while pos - sb.replay_pos < J:
            phys = pos % J
            if J - phys < sb.batch_max:
                pos += J - phys
                continue
            h = F.decode_batch_header(self._read(joff + phys, P))
            if h is None or h.store_id != sb.store_id or h.first_seq != expect or h.prev_crc != prev:
                break
            size = h.nblocks * P
            payload = self._read(joff + phys + F.BATCH_HEADER_SIZE, h.payload_len)
            if F.crc32c(payload) != h.payload_crc:
                break
            recs, _problem = F.decode_records(payload, h.first_seq, h.nrec)
            out.append((joff + phys, F.BATCH_HEADER_SIZE + h.payload_len, size, h.first_seq, h.nrec, recs,
                        h.durable_seq))
            expect += h.nrec
            prev = h.hdr_crc
            pos += size
        return out


def _flip(path: str, offsets_bits: list[tuple[int, int]]) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        for off, bit in offsets_bits:
            b = os.pread(fd, 1, off)
            os.pwrite(fd, bytes((b[0] ^ (1 << bit),)), off)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _state_at(snaps, seq: int) -> dict:
    """The model as of journal sequence ``seq`` (the last snapshot at or below it)."""
    best = snaps[0][1]
    for s, m in snaps:
        if s <= seq:
            best = m
        else:
            break
    return best


async def _run_round(seed: int, workdir: str, engine: str, nops: int) -> RoundResult:
    rng = random.Random(seed)
    res = RoundResult(seed)
    path = os.path.join(workdir, f"c{seed}.data")
    if os.path.exists(path):
        os.unlink(path)
    res.region = region = REGIONS[seed % len(REGIONS)] if rng.random() < 0.9 else rng.choice(REGIONS)
    res.ending = ending = "crash" if region == "journal" or rng.random() < 0.4 else "close"
    store = await BlobStore.create(path, STORE_SIZE, journal_size=JOURNAL_SIZE, engine=engine,
                                   checkpoint_threshold=CHECKPOINT_THRESHOLD, **POOL)
    keys, model, history, snaps = await _workload(store, rng, nops)
    extents = {}
    for k in model:  # test-only peek at the index: where each blob's bytes live
        page, length, digest = store._index.get(k)
        assert digest == model[k]
        extents[k] = (page * store.page_size, length, -(-length // store.page_size) * store.page_size)
    if ending == "close":
        await store.close()
    else:
        await store.flush()
        await store.abandon()

    fm = FileMap(path)
    P = fm.P
    expect: dict[bytes, set] = {k: {model.get(k, ABSENT)} for k in keys}
    flips: list[tuple[int, int]] = []

    def add(pos: int) -> bool:
        if any(pos == o for o, _b in flips):
            return False
        flips.append((pos, rng.randrange(8)))
        return True

    nflips = rng.randint(1, 3)
    open_must_fail = False

    if region == "data":
        live = [k for k in extents if extents[k][1] > 0]
        if not live:
            region = res.region = "superblock"
        else:
            damaged = set()
            for _ in range(nflips):
                k = rng.choice(live)
                off, length, total = extents[k]
                o = rng.randrange(total) if rng.random() < 0.3 else rng.randrange(length)
                if not add(off + o):
                    continue  # one flip per byte (two flips of one bit would cancel)
                if o < length:
                    damaged.add(k)
                else:
                    res.padding_flips += 1
            res.damaged_blobs = len(damaged)
            for k in damaged:
                expect[k] = {CORRUPT}
            if ending == "crash":
                # Recovery verifies the PUT records past the last durable point a batch recorded (a
                # flush leaves none): a damaged one looks like data that never reached the medium, and
                # replay ends before its batch (prefix semantics), flushed records after it included.
                sb = fm.slots[fm.newest]
                durable = max([b[6] for b in fm.batches] + [sb.ckpt_seq])
                cut = None
                for off_b, prot, total, first_seq, nrec, recs, _d in fm.batches:
                    for r in recs:
                        if r[0] == F.REC_PUT and r[1] > durable and r[4] and any(
                                r[3] * P <= o < r[3] * P + r[4] for o, _bit in flips):
                            cut = first_seq
                            break
                    if cut is not None:
                        break
                if cut is not None:
                    res.truncated = True
                    then = _state_at(snaps, cut - 1)
                    for k in keys:
                        was = then.get(k, ABSENT)
                        if was != model.get(k, ABSENT):
                            expect[k] = {was, CORRUPT}  # its older extent may hold other bytes now
                        elif k in damaged:
                            expect[k] = {CORRUPT}
    if region == "checkpoint":
        cands = [(slot, c) for slot, cs in fm.chunks.items() for c in cs]
        if not cands:
            region = res.region = "superblock"
        else:
            hit = set()
            for _ in range(nflips):
                slot, (off, prot, total) = rng.choice(cands)
                o = rng.randrange(prot) if rng.random() < 0.85 else rng.randrange(total)
                if not add(off + o):
                    continue  # one flip per byte (two flips of one bit would cancel)
                if o < prot:
                    hit.add(slot)
                else:
                    res.padding_flips += 1
            if fm.newest in hit:
                res.fallback = True
                if fm.older is None or fm.older in hit:
                    open_must_fail = True
    if region == "superblock":
        hit = set()
        for _ in range(nflips):
            slot = rng.randrange(2)
            o = rng.randrange(F.SB_SIZE) if rng.random() < 0.85 else rng.randrange(P)
            if not add(slot * P + o):
                continue  # one flip per byte (two flips of one bit would cancel)
            if o < F.SB_SIZE:
                hit.add(slot)
            else:
                res.padding_flips += 1
        if fm.newest in hit:
            res.fallback = True
            if fm.older is None or fm.older in hit:
                open_must_fail = True
    if region == "journal":
        sb = fm.slots[fm.newest]
        joff, jbytes = sb.journal_page * P, sb.journal_pages * P
        first_bad = None
        for _ in range(nflips):
            if fm.batches and rng.random() < 0.75:
                off, prot, total = rng.choice(fm.batches)[:3]
                o = rng.randrange(prot) if rng.random() < 0.85 else rng.randrange(total)
                pos = off + o
            else:
                pos = joff + rng.randrange(jbytes)
            if not add(pos):
                continue  # one flip per byte (two flips of one bit would cancel)
            for off, prot, total, first_seq, *_ in fm.batches:
                if off <= pos < off + prot:
                    first_bad = first_seq if first_bad is None else min(first_bad, first_seq)
                elif off + prot <= pos < off + total:
                    res.padding_flips += 1
        if first_bad is not None:
            res.truncated = True
            then = _state_at(snaps, first_bad - 1)
            for k in keys:
                was = then.get(k, ABSENT)
                expect[k] = {was} if was == model.get(k, ABSENT) else {was, CORRUPT}
    res.flips = len(flips)
    _flip(path, flips)

    try:
        store = await BlobStore.open(path, engine=engine, **POOL)
    except Corrupt as exc:
        if open_must_fail:
            res.open_refused = True
        else:
            res.crashes += 1
            res.violations.append(f"open failed with {exc!r}; a redundant copy should have been used")
        os.unlink(path)
        return res
    except Exception as exc:
        res.crashes += 1
        res.violations.append(f"open failed: {exc!r}")
        os.unlink(path)
        return res
    try:
        if open_must_fail:
            res.violations.append("both redundant copies are damaged, yet the store opened")
        listed = {k async for k in store.list()}
        corrupt = set()
        seen_now: dict[bytes, object] = {}
        for k in keys:
            res.keys_checked += 1
            try:
                got = blake3.blake3(await store.get(k)).digest()
            except NotFound:
                got = ABSENT
            except Corrupt:
                got = CORRUPT
                corrupt.add(k)
                res.detected += 1
            except Exception as exc:
                res.crashes += 1
                res.violations.append(f"{k!r}: get raised {exc!r}")
                continue
            seen_now[k] = got
            if got not in expect[k]:
                if got == CORRUPT:
                    res.violations.append(f"{k!r}: Corrupt, but its bytes were not damaged (region {region})")
                elif got == ABSENT or got in history[k]:
                    res.lost_acknowledged += 1
                    res.violations.append(f"{k!r}: an acknowledged durable write is lost (got "
                                          f"{got if got == ABSENT else got.hex()[:12]})")
                else:
                    res.wrong_bytes += 1
                    res.violations.append(f"{k!r}: returned bytes that were never put for it")
            if (got != ABSENT) != (k in listed):
                res.violations.append(f"{k!r}: list() and get() disagree")
        if region == "data" and ending == "close":
            missed = {k for k in keys if expect[k] == {CORRUPT}} - corrupt
            if missed:
                res.violations.append(f"damaged blobs not reported Corrupt: {sorted(missed)}")
        sc = await store.scrub()
        if set(sc["bad_keys"]) != corrupt:
            res.violations.append(f"scrub reports {sorted(sc['bad_keys'])}, get found {sorted(corrupt)} corrupt")
        if sc["unreadable_keys"]:  # flipped bits are damage, never read errors
            res.violations.append(f"scrub reports read errors on {sorted(sc['unreadable_keys'])}")
        # life goes on: repair the damaged blobs, write and delete a few more, checkpoint and reopen;
        # what the damaged store served must survive (a fallback or a dropped tail must not leave the
        # allocator handing out pages that live blobs still use)
        seen = dict(seen_now)
        for k in sorted(corrupt) + rng.sample(keys, 3):
            v = _value(rng)
            await store.put(k, v, sync=rng.random() < 0.5)
            seen[k] = blake3.blake3(v).digest()
            history[k].append(seen[k])
        gone = rng.choice(keys)
        await store.delete(gone)
        seen[gone] = ABSENT
        await store.put(b"after-damage", b"n" * 6000, sync=True)
        if await store.get(b"after-damage") != b"n" * 6000:
            res.violations.append("the store does not read back a new write")
    finally:
        await store.close()
    try:
        store = await BlobStore.open(path, engine=engine, **POOL)
    except Exception as exc:
        res.crashes += 1
        res.violations.append(f"the repaired store does not reopen: {exc!r}")
        os.unlink(path)
        return res
    try:
        for k in keys:
            try:
                got = blake3.blake3(await store.get(k)).digest()
            except NotFound:
                got = ABSENT
            except Corrupt:
                got = CORRUPT
            if k in seen and got != seen[k]:
                if got == CORRUPT:
                    res.violations.append(f"{k!r}: Corrupt after the repair and a reopen")
                elif got == ABSENT or got in history[k]:
                    res.lost_acknowledged += 1
                    res.violations.append(f"{k!r}: after the repair and a reopen, a write is lost")
                else:
                    res.wrong_bytes += 1
                    res.violations.append(f"{k!r}: after the repair and a reopen, bytes never put for it")
        if (await store.scrub())["bad_keys"]:
            res.violations.append("scrub finds damage after the repair")
        else:
            res.repaired = len(corrupt)
    finally:
        await store.close()
    os.unlink(path)
    return res


def run_rounds(seeds, *, engine: str = "uring", workdir: str | None = None, nops: int = 70) -> list[RoundResult]:
    """Run one corruption round per seed on the ext4 file system under the repo."""
    own = workdir is None
    if own:
        workdir = os.path.join(REPO, ".test-tmp", f"corruption-{os.getpid()}")
    os.makedirs(workdir, exist_ok=True)
    try:
        return [asyncio.run(_run_round(seed, workdir, engine, nops)) for seed in seeds]
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def figures(results: list[RoundResult], seconds: float) -> dict:
    return {
        "suite": "corruption",
        "count": len(results),
        "unit": "bit-flip rounds",
        "acknowledged_lost": sum(r.lost_acknowledged for r in results),
        "wrong_bytes": sum(r.wrong_bytes for r in results),
        "crashes": sum(r.crashes for r in results),
        "seconds": round(seconds, 1),
        "bit_flips": sum(r.flips for r in results),
        "damaged_blobs": sum(r.damaged_blobs for r in results),
        "corrupt_reported": sum(r.detected for r in results),
        "damaged_blobs_repaired": sum(r.repaired for r in results),
        "padding_flips_unnoticed": sum(r.padding_flips for r in results),
        "slot_fallbacks": sum(1 for r in results if r.fallback and not r.open_refused),
        "journal_truncations": sum(1 for r in results if r.truncated),
        "opens_refused_both_copies_damaged": sum(1 for r in results if r.open_refused),
        "failed_rounds": sum(1 for r in results if r.violations),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="ringblob corruption rounds: seeded bit flips in a closed store")
    ap.add_argument("--rounds", type=int, default=1000, help="number of seeded rounds (default 1000)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, help="run just this seed (reproduce a failure)")
    ap.add_argument("--engine", default="uring", help="engine (uring or psync)")
    ap.add_argument("--ops", type=int, default=70, help="workload ops per round")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if not args.verbose:  # the store logs every checksum failure and fallback; the summary says what matters
        logging.getLogger("ringblob").setLevel(logging.CRITICAL)
    seeds = [args.seed] if args.seed is not None else range(args.first_seed, args.first_seed + args.rounds)
    t0 = time.monotonic()
    results = run_rounds(seeds, engine=args.engine, nops=args.ops)
    bad = [r for r in results if r.violations]
    for r in bad[:50]:
        print(f"seed {r.seed} ({r.region}, {r.ending}): " + "; ".join(r.violations[:4]))
    print("FIGURES " + json.dumps(figures(results, time.monotonic() - t0)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
