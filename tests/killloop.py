"""Kill -9 loop: the real daemon under load from several client processes, SIGKILLed, restarted, verified.

RocksDB's crash test for ringblob. One run:

1. start ``ringblob serve`` (tests/conftest.py's ``Daemon``) on a data file
   under .test-tmp/ (ext4, O_DIRECT as in production);
2. start a few client *processes* (multiprocessing, spawn). Each owns its key
   space and runs a seeded mix of sync puts, non-sync puts, deletes, gets and
   flushes, with a blocking :class:`ringblob.Client` or several tasks sharing
   one pipelined :class:`ringblob.AsyncClient`. Every value names its key and
   the sequence number of the op that wrote it and is derived from them
   (BLAKE3 XOF), so any value read back is checkable byte for byte;
3. each round: the parent says "go", waits a seeded 0.2-0.8 s and SIGKILLs the
   daemon. The clients see ``ConnectionLost`` (their in-flight op is
   unacknowledged), park and report; the parent restarts the daemon and checks
   every key against the clients' logs, then the next round begins (the
   clients reconnect);
   Some restarts are themselves SIGKILLed 0-0.5 s in (during store open and
   journal replay) before the real restart;
4. at the end: SIGTERM (must exit 0), restart, and every key must read exactly
   as the last check saw it.

The logs: each client process appends to its own file, in program order,
``I`` (an op issued, before it is sent), ``A`` (acknowledged, ``S`` sync or
``N`` not), ``F`` (flush sent) and ``FA`` (flush acknowledged) records, and
fsyncs the file after every durable acknowledgement (a sync put/delete or a
flush returned). A write is *acknowledged durable* when it was a sync op that
returned, or a non-sync op acknowledged before a flush was sent that returned.

Invariants after every restart, per key: the value is that of its last
acknowledged durable op or of a later op of its client on that key (issued,
maybe never acknowledged); absent only if that op was a delete, none exists,
or a later delete was issued; never bytes that were not put for the key,
never ``Corrupt``; ``list()`` names only keys of the key spaces and agrees
with ``get``. The daemon must restart every time.

Run directly for the torture figures: ``python tests/killloop.py --rounds 300``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import blake3

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

ABSENT = "absent"
KEYS_PER_CLIENT = 24
ASYNC_TASKS = 4
PARK_TIMEOUT = 60.0  # seconds a client may take to notice the kill and park


# -- values: self-describing, derived from (key, seq) --------------------------------------


def make_value(key: bytes, seq: int, n: int) -> bytes:
    """The value op ``seq`` puts under ``key``: a header naming both, then ``n`` bytes of BLAKE3 XOF."""
    head = b"%s|%d|%d\n" % (key, seq, n)
    return head + blake3.blake3(head).digest(length=n) if n else head


def decode_value(key: bytes, value: bytes) -> int | None:
    """The seq of the op that wrote ``value`` under ``key``, or ``None`` if these bytes were never put for it."""
    nl = value.find(b"\n")
    if nl < 0 or nl > 400:
        return None
    parts = value[:nl].split(b"|")
    if len(parts) != 3 or parts[0] != key:
        return None
    try:
        seq, n = int(parts[1]), int(parts[2])
    except ValueError:
        return None
    if n < 0 or n > 1 << 26 or make_value(key, seq, n) != value:
        return None
    return seq


def _size(rng: random.Random) -> int:
    if rng.random() < 0.03:  # multi-buffer writes (the daemon's fixed buffers are 256 KiB)
        return rng.randrange(200_000, 1_000_000)
    return rng.choice((0, 1, 100, 4000, 4096, 5000, 8192, 12000, rng.randrange(0, 40000)))


# -- the client processes ------------------------------------------------------------------


class _Log:
    """The append-only, fsynced log of one client process (one text line per record)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, line: str, durable: bool = False) -> None:
        os.write(self.fd, (line + "\n").encode())
        if durable:
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class _Worker:
    """One key space's op generator and read-your-writes checker (shared by sync and async modes)."""

    def __init__(self, cid: int, keys: list[bytes], rng: random.Random, log: _Log, counters: dict, seqs):
        self.cid, self.keys, self.rng, self.log, self.c = cid, keys, rng, log, counters
        self.seqs = seqs  # shared itertools-like counter of the process
        self.issued_puts: dict[bytes, set] = {k: set() for k in keys}
        self.known: dict[bytes, object] = {}  # key -> seq or ABSENT, exact since this connection began

    def reset(self) -> None:
        self.known.clear()

    def next_op(self):
        r = self.rng.random()
        key = self.rng.choice(self.keys)
        if r < 0.25:
            return ("put", key, True)
        if r < 0.50:
            return ("put", key, False)
        if r < 0.60:
            return ("mput", key, self.rng.random() < 0.5)
        if r < 0.70:
            return ("del", key, True)
        if r < 0.75:
            return ("del", key, False)
        if r < 0.90:
            return ("get", key, None)
        return ("flush", None, None)

    def issue(self, kind: str, key: bytes) -> list:
        """Log the ``I`` records of a write; return its items ``[(key, seq, state, value or None)]``."""
        keys = self.rng.sample(self.keys, min(len(self.keys), self.rng.randint(2, 3))) if kind == "mput" else [key]
        items = []
        for k in keys:
            seq = next(self.seqs)
            if kind == "del":
                self.log.write(f"I {seq} {k.decode()} D")
                items.append((k, seq, ABSENT, None))
            else:
                n = _size(self.rng)
                self.issued_puts[k].add(seq)
                self.log.write(f"I {seq} {k.decode()} P {n}")
                items.append((k, seq, seq, make_value(k, seq, n)))
        return items

    def acked(self, items: list, sync: bool) -> None:
        """Log the ``A`` records of an acknowledged write (fsynced when it was a sync one)."""
        for i, (k, seq, state, _) in enumerate(items):
            self.log.write(f"A {seq} {'S' if sync else 'N'}", sync and i == len(items) - 1)
            self.known[k] = state
        self.c["acked"] += len(items)
        self.c["acked_durable"] += len(items) if sync else 0

    def check_get(self, key: bytes, got) -> None:
        """``got``: bytes or ABSENT. Wrong bytes are logged (``W``) and counted."""
        self.c["gets"] += 1
        if got is ABSENT:
            state = ABSENT
        else:
            seq = decode_value(key, got)
            if seq is None or seq not in self.issued_puts[key]:
                self.c["wrong_bytes"] += 1
                self.log.write(f"W {key.decode()} never-put bytes len={len(got)} head={got[:40]!r}", True)
                return
            state = seq
        if key in self.known and self.known[key] != state:
            self.c["wrong_bytes"] += 1
            self.log.write(f"W {key.decode()} read {state} after acknowledged {self.known[key]} (no restart between)", True)


def _client_main(cid: int, mode: str, sock: str, log_path: str, seed: int, cmd_q, res_q) -> None:
    """A client process: on "go" run ops until the connection is lost, then park and report."""
    import itertools

    rng = random.Random(seed)
    log = _Log(log_path)
    counters = {"acked": 0, "acked_durable": 0, "gets": 0, "wrong_bytes": 0, "errors": 0, "segments": 0, "unacked": 0}
    seqs = itertools.count(1)
    keys = [b"c%d-k%d" % (cid, i) for i in range(KEYS_PER_CLIENT)]
    tasks = 1 if mode == "sync" else ASYNC_TASKS
    workers = [_Worker(cid, keys[t::tasks], random.Random(rng.random()), log, counters, seqs) for t in range(tasks)]
    flush_ids = itertools.count(1)
    try:
        while True:
            cmd = cmd_q.get()
            if cmd == "stop":
                break
            counters["segments"] += 1
            for w in workers:
                w.reset()
            if mode == "sync":
                _sync_segment(sock, workers[0], log, counters, seqs, flush_ids)
            else:
                asyncio.run(_async_segment(sock, workers, log, counters, seqs, flush_ids))
            res_q.put(("parked", cid, dict(counters)))
    finally:
        log.close()
        res_q.put(("stopped", cid, dict(counters)))


def _error(log: _Log, counters: dict, what: str, exc: BaseException) -> None:
    counters["errors"] += 1
    log.write(f"E {what} {type(exc).__name__}: {exc}".replace("\n", " "), True)


def _sync_segment(sock, w: _Worker, log: _Log, counters, seqs, flush_ids) -> None:
    from ringblob import Client
    from ringblob.errors import ConnectionLost, NotFound, RingblobError

    try:
        client = Client(sock, timeout=30)
    except OSError:
        return  # killed before we connected
    deadline = time.monotonic() + 120
    with client:
        while time.monotonic() < deadline:
            kind, key, sync = w.next_op()
            try:
                if kind == "get":
                    try:
                        got = client.get(key)
                    except NotFound:
                        got = ABSENT
                    w.check_get(key, got)
                elif kind == "flush":
                    fid = next(flush_ids)
                    log.write(f"F {fid}")
                    client.flush()
                    log.write(f"FA {fid}", True)
                else:
                    items = w.issue(kind, key)
                    if kind == "put":
                        client.put(key, items[0][3], sync=sync)
                    elif kind == "del":
                        client.delete(key, sync=sync)
                    else:
                        client.put_many([(k, v) for k, _, _, v in items], sync=sync)
                    w.acked(items, sync)
            except (ConnectionLost, OSError):
                counters["unacked"] += len(items) if kind in ("put", "del", "mput") else 0
                return
            except RingblobError as exc:
                _error(log, counters, f"{kind} {key!r}", exc)
                for k, *_ in items if kind in ("put", "del", "mput") else [(key,)]:
                    w.known.pop(k, None)


async def _async_segment(sock, workers, log: _Log, counters, seqs, flush_ids) -> None:
    from ringblob import AsyncClient
    from ringblob.errors import ConnectionLost, NotFound, RingblobError

    client = AsyncClient(sock, timeout=30)
    try:
        await client.connect()
    except OSError:
        return
    lost = asyncio.Event()

    async def run(w: _Worker) -> None:
        deadline = time.monotonic() + 120
        while not lost.is_set() and time.monotonic() < deadline:
            kind, key, sync = w.next_op()
            try:
                if kind == "get":
                    try:
                        got = await client.get(key)
                    except NotFound:
                        got = ABSENT
                    w.check_get(key, got)
                elif kind == "flush":
                    fid = next(flush_ids)
                    log.write(f"F {fid}")
                    await client.flush()
                    log.write(f"FA {fid}", True)
                else:
                    items = w.issue(kind, key)
                    if kind == "put":
                        await client.put(key, items[0][3], sync=sync)
                    elif kind == "del":
                        await client.delete(key, sync=sync)
                    else:
                        await client.put_many([(k, v) for k, _, _, v in items], sync=sync)
                    w.acked(items, sync)
            except (ConnectionLost, OSError):
                counters["unacked"] += len(items) if kind in ("put", "del", "mput") else 0
                lost.set()
                return
            except RingblobError as exc:
                _error(log, counters, f"{kind} {key!r}", exc)
                for k, *_ in items if kind in ("put", "del", "mput") else [(key,)]:
                    w.known.pop(k, None)

    try:
        await asyncio.gather(*(run(w) for w in workers))
    finally:
        await client.close()


# -- the model built from the logs ------------------------------------------------------------


@dataclass
class KeyModel:
    """One key's history: issued ops in order and the last acknowledged durable one."""

    ops: list = field(default_factory=list)  # [(seq, "P"|"D")]
    durable: tuple | None = None  # (seq, "P"|"D")
    sizes: dict = field(default_factory=dict)  # seq of a put -> its payload length (bytes)

    def allowed(self, state) -> str | None:
        """None when ``state`` (a seq or ABSENT) is allowed; else "lost" or "wrong"."""
        d_seq = self.durable[0] if self.durable else 0
        if state is ABSENT:
            if self.durable is None or self.durable[1] == "D":
                return None
            if any(s > d_seq and k == "D" for s, k in self.ops):
                return None
            return "lost"
        if not any(s == state and k == "P" for s, k in self.ops):
            return "wrong"
        if state < d_seq or (state == d_seq and self.durable[1] != "P"):
            return "lost"
        return None


class LogReader:
    """Incremental parser of one client's log into per-key models (each call reads what was appended)."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0
        self.models: dict[bytes, KeyModel] = {}
        self.by_seq: dict[int, tuple[bytes, str]] = {}
        self.acked_nonsync: list[int] = []
        self.flush_marks: dict[str, int] = {}
        self.bad: list[str] = []  # W (wrong bytes seen by the client) and E (unexpected error) lines

    def _durable(self, seq: int) -> None:
        key, kind = self.by_seq[seq]
        m = self.models[key]
        if m.durable is None or m.durable[0] < seq:
            m.durable = (seq, kind)

    def update(self) -> "LogReader":
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # only whole lines
        self.offset += end
        for line in data[:end].decode().splitlines():
            parts = line.split()
            if not parts:
                continue
            tag = parts[0]
            if tag == "I":
                seq, key, kind = int(parts[1]), parts[2].encode(), parts[3]
                m = self.models.setdefault(key, KeyModel())
                m.ops.append((seq, kind))
                if kind == "P":
                    m.sizes[seq] = int(parts[4])
                self.by_seq[seq] = (key, kind)
            elif tag == "A":
                seq = int(parts[1])
                if parts[2] == "S":
                    self._durable(seq)
                else:
                    self.acked_nonsync.append(seq)
            elif tag == "F":
                self.flush_marks[parts[1]] = len(self.acked_nonsync)
            elif tag == "FA":
                upto = self.flush_marks.pop(parts[1])
                for seq in self.acked_nonsync[:upto]:
                    self._durable(seq)
                del self.acked_nonsync[:upto]
                for fid in self.flush_marks:
                    self.flush_marks[fid] = max(0, self.flush_marks[fid] - upto)
            elif tag in ("W", "E"):
                self.bad.append(line.strip())
        return self


def read_log(path: str) -> tuple[dict[bytes, KeyModel], list[str]]:
    """Parse a whole client log: per-key models and its ``W``/``E`` (violation) lines."""
    r = LogReader(path).update()
    return r.models, r.bad


# -- the parent: rounds ---------------------------------------------------------------------


@dataclass
class RunResult:
    """Totals of one kill -9 run; ``violations`` empty means every invariant held."""

    seed: int
    rounds: int = 0
    keys_checked: int = 0
    durable_checked: int = 0
    acknowledged: int = 0
    acknowledged_durable: int = 0
    unacknowledged: int = 0
    client_gets: int = 0
    lost_acknowledged: int = 0
    wrong_bytes: int = 0
    corrupt: int = 0
    crashes: int = 0
    recovery_kills: int = 0
    violations: list[str] = field(default_factory=list)
    client_reports: set = field(default_factory=set)  # W/E lines already counted
    phase_seconds: dict = field(default_factory=lambda: {"load": 0.0, "park": 0.0, "restart": 0.0, "verify": 0.0})


def _verify(sock: str, logs: list, res: RunResult, where: str, expect: dict | None = None) -> dict:
    """Check every key against the logs (or, with ``expect``, against exactly those states); return the states read."""
    from ringblob import Client
    from ringblob.errors import NotFound, RingblobError

    models: dict[bytes, KeyModel] = {}
    for log in logs:
        log = LogReader(log) if isinstance(log, str) else log
        log.update()
        models.update(log.models)
        for line in log.bad:
            if line not in res.client_reports:
                res.client_reports.add(line)
                res.violations.append(f"{where}: client reported: {line}")
                if line.startswith("W"):
                    res.wrong_bytes += 1
    states: dict[bytes, object] = {}
    with Client(sock, timeout=30) as c:
        listed = set(c.list())
        for key, m in sorted(models.items()):
            res.keys_checked += 1
            res.durable_checked += m.durable is not None
            try:
                value = c.get(key)
            except NotFound:
                state = ABSENT
            except RingblobError as exc:
                res.corrupt += 1
                res.violations.append(f"{where}: get {key!r} raised {type(exc).__name__}: {exc}")
                continue
            else:
                state = decode_value(key, value)
                if state is not None and state in m.sizes and value != make_value(key, state, m.sizes[state]):
                    state = None  # a well-formed value of the right op, but not the length that op put
                if state is None:
                    res.wrong_bytes += 1
                    res.violations.append(f"{where}: {key!r} returned bytes never put for it: {value[:60]!r}")
                    continue
            states[key] = state
            if expect is not None:
                verdict = None if expect.get(key, ABSENT) == state else "lost"
            else:
                verdict = m.allowed(state)
            if verdict == "lost":
                res.lost_acknowledged += 1
                res.violations.append(f"{where}: {key!r} reads {state}, acknowledged durable {m.durable} "
                                      f"(expected {expect.get(key) if expect is not None else 'it or later'})")
            elif verdict == "wrong":
                res.wrong_bytes += 1
                res.violations.append(f"{where}: {key!r} returned seq {state}, never issued as a put of it")
            if (state is not ABSENT) != (key in listed):
                res.violations.append(f"{where}: list() and get() disagree on {key!r}")
        for key in listed - set(models):
            res.wrong_bytes += 1
            res.violations.append(f"{where}: list() names {key!r}, a key no client ever put")
    return states


def run(rounds: int, *, seed: int = 0, clients: int = 3, min_load: float = 0.2, max_load: float = 0.8,
        engine: str = "auto", recovery_kill_rate: float = 0.15, workdir: str | None = None, progress=None) -> RunResult:
    """One kill -9 run of ``rounds`` rounds with ``clients`` client processes; see the module docstring.

    ``min_load``/``max_load``: seconds of load before each kill (seeded uniform).
    ``recovery_kill_rate``: the share of restarts that are first killed again
    0-0.5 s into startup (during store open and journal replay). The seed fixes
    the kill moments and every client's ops, not the interleaving the kernel
    chooses, so a failure is reproduced statistically, not exactly; the files
    of a failing run are kept and its violations name the round and key.
    """
    from conftest import Daemon, make_tmp

    res = RunResult(seed)
    rng = random.Random(seed)
    own = workdir is None
    wd = make_tmp(f"kill-{seed}-") if own else __import__("pathlib").Path(workdir)
    extra = ["--engine", engine, "--shutdown-timeout", "10"]

    def start() -> "Daemon":
        d = Daemon(wd, *extra, size="64M")
        d.start()
        return d

    def discard(d) -> None:
        d.kill()
        fh = getattr(d, "_logfh", None)
        if fh is not None:
            fh.close()

    ctx = mp.get_context("spawn")
    res_q = ctx.Queue()
    cmd_qs, procs = [], []
    log_paths = [str(wd / f"client{i}.log") for i in range(clients)]
    for p in log_paths:
        open(p, "wb").close()
    readers = [LogReader(p) for p in log_paths]
    daemon = None
    try:
        daemon = start()
        for i in range(clients):
            q = ctx.Queue()
            mode = "sync" if i % 2 == 0 else "async"
            p = ctx.Process(target=_client_main, args=(i, mode, str(daemon.socket), log_paths[i], rng.randrange(1 << 30), q, res_q),
                            daemon=True)
            p.start()
            cmd_qs.append(q)
            procs.append(p)
        counters: dict[int, dict] = {}
        last_states: dict = {}
        for r in range(rounds):
            for q in cmd_qs:
                q.put("go")
            t = time.monotonic()
            time.sleep(rng.uniform(min_load, max_load))
            t = _phase(res, "load", t)
            if daemon.proc.poll() is not None:
                res.crashes += 1
                res.violations.append(f"round {r}: the daemon died on its own ({daemon.proc.returncode}):\n{daemon.output()[-2000:]}")
                break
            discard(daemon)  # SIGKILL
            parked = 0
            deadline = time.monotonic() + PARK_TIMEOUT
            while parked < clients:
                try:
                    tag, cid, c = res_q.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    res.violations.append(f"round {r}: a client did not notice the kill within {PARK_TIMEOUT} s")
                    raise _Abort()
                if tag != "parked":
                    res.violations.append(f"round {r}: client {cid} exited ({tag})")
                    raise _Abort()
                counters[cid] = c
                parked += 1
            t = _phase(res, "park", t)
            if rng.random() < recovery_kill_rate:
                # kill -9 again while the daemon opens the store and replays its journal
                d = Daemon(wd, *extra, size="64M")
                with open(d.log, "wb") as fh:
                    p = subprocess.Popen(d.args, cwd=d.cwd, stdout=fh, stderr=subprocess.STDOUT)
                    time.sleep(rng.uniform(0.0, 0.5))
                    p.kill()
                    p.wait()
                res.recovery_kills += 1
            try:
                daemon = start()
            except AssertionError as exc:
                res.crashes += 1
                res.violations.append(f"round {r}: the daemon did not restart after SIGKILL: {exc}")
                daemon = None
                break
            res.rounds += 1
            before = len(res.violations)
            t = _phase(res, "restart", t)
            last_states = _verify(str(daemon.socket), readers, res, f"round {r}")
            _phase(res, "verify", t)
            if len(res.violations) > before:
                res.violations.append(f"round {r}: daemon log tail:\n{daemon.output()[-1500:]}")
            if progress:
                progress(r, res)
        if daemon is not None and not res.violations:
            rc = daemon.stop()
            daemon._logfh.close()
            if rc != 0:
                res.crashes += 1
                res.violations.append(f"SIGTERM: the daemon exited with {rc}:\n{daemon.output()[-2000:]}")
            daemon = start()
            _verify(str(daemon.socket), readers, res, "after a clean restart", expect=last_states)
        for c in counters.values():
            res.acknowledged += c["acked"]
            res.acknowledged_durable += c["acked_durable"]
            res.unacknowledged += c["unacked"]
            res.client_gets += c["gets"]
    except _Abort:
        pass
    finally:
        for q in cmd_qs:
            q.put("stop")
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        if daemon is not None:
            discard(daemon)
        res_q.close()
        for q in cmd_qs:
            q.close()
        if own and not res.violations:
            shutil.rmtree(wd, ignore_errors=True)
        elif res.violations:
            res.violations.append(f"(files kept in {wd})")
    return res


def _phase(res: RunResult, name: str, t: float) -> float:
    now = time.monotonic()
    res.phase_seconds[name] += now - t
    return now


class _Abort(Exception):
    pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="ringblob kill -9 loop: real daemon, client processes, SIGKILL, verify")
    ap.add_argument("--rounds", type=int, default=300, help="kill -9 rounds (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments and the clients' ops")
    ap.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    ap.add_argument("--min-load", type=float, default=0.2, help="shortest load before a kill (seconds)")
    ap.add_argument("--max-load", type=float, default=0.8, help="longest load before a kill (seconds)")
    ap.add_argument("--engine", default="auto", help="daemon engine: auto, uring or psync")
    args = ap.parse_args(argv)
    t0 = time.monotonic()

    def progress(r, res):
        if (r + 1) % 25 == 0:
            print(f"killloop: {r + 1} rounds, {res.keys_checked} keys checked, {len(res.violations)} violations",
                  file=sys.stderr, flush=True)

    res = run(args.rounds, seed=args.seed, clients=args.clients, min_load=args.min_load, max_load=args.max_load,
              engine=args.engine, progress=progress)
    for v in res.violations[:20]:
        print(v)
    figures = {
        "suite": "kill -9 loop",
        "count": res.rounds,
        "unit": "kill -9 rounds (real daemon, SIGKILL under load)",
        "acknowledged_lost": res.lost_acknowledged,
        "wrong_bytes": res.wrong_bytes,
        "crashes": res.crashes,
        "seconds": round(time.monotonic() - t0, 1),
        "client_processes": args.clients,
        "acknowledged_writes": res.acknowledged,
        "acknowledged_durable_writes": res.acknowledged_durable,
        "unacknowledged_in_flight": res.unacknowledged,
        "key_checks": res.keys_checked,
        "corrupt": res.corrupt,
        "kills_during_recovery": res.recovery_kills,
        "phase_seconds": {k: round(v, 1) for k, v in res.phase_seconds.items()},
    }
    print("FIGURES " + json.dumps(figures))
    bad = res.violations or res.rounds < args.rounds
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
