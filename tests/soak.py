"""Load and soak: many concurrent connections with mixed traffic for a bounded time, then every check.

One run:

1. start ``ringblob serve`` (tests/conftest.py's ``Daemon``) with Prometheus
   metrics on an ephemeral port, on a data file under .test-tmp/ (ext4);
2. count the daemon's open file descriptors (/proc/PID/fd) with no client
   connected;
3. start ``procs`` client processes (multiprocessing, spawn), each opening
   ``conns`` :class:`ringblob.AsyncClient` connections (64 in all by default)
   with two tasks per connection. Every task owns its keys and keeps an exact
   model of them (BLAKE3 digest or absent); it runs a seeded mix of sync and
   non-sync puts, gets, has, deletes, get_many and flushes until the deadline,
   checking every read against the model as it goes (no crash happens, so
   every read must be exact);
4. meanwhile sample the daemon's VmRSS (/proc/PID/status) every 0.2 s;
5. afterwards: every key of every model reads back exactly (``get``), the RSS
   did not keep growing (the last third's peak within a margin of the first
   third's) and stayed under a cap, the descriptor count is back to where it
   was once all clients closed, and /metrics (parsed with prometheus_client)
   shows no request with a non-ok status except the ``not_found`` gets the
   clients provoked (their exact count), no checksum failure and not
   read-only; SIGTERM stops the daemon with status 0.

Run directly for the torture figures: ``python tests/soak.py --seconds 180``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

import blake3

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from conftest import scrape  # noqa: E402  (the daemon's /metrics as a dict)

KEYS_PER_TASK = 6
TASKS_PER_CONN = 2
RSS_CAP = 1 << 30  # bytes: a daemon of this size past 1 GiB RSS is a leak, not a working set
RSS_GROWTH_FACTOR = 1.25  # last third's peak may exceed the first third's by this factor ...
RSS_GROWTH_SLACK = 32 << 20  # ... plus this many bytes (allocator noise, buffer warm-up)


def _size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.5:
        return rng.randrange(0, 4097)
    if r < 0.9:
        return rng.randrange(4097, 32 << 10)
    return rng.randrange(32 << 10, 128 << 10)


# -- client processes ----------------------------------------------------------------------


def _client_main(pid: int, sock: str, conns: int, seconds: float, seed: int, start_evt, res_q) -> None:
    """One client process: ``conns`` AsyncClients, two tasks each, mixed ops until the deadline."""
    try:
        out = asyncio.run(_client(pid, sock, conns, seconds, seed, start_evt))
    except BaseException as exc:  # report, never hang the parent
        res_q.put(("failed", pid, f"{type(exc).__name__}: {exc}"))
        return
    res_q.put(("done", pid, out))


async def _client(pid: int, sock: str, conns: int, seconds: float, seed: int, start_evt) -> dict:
    from ringblob import AsyncClient
    from ringblob.errors import NotFound, RingblobError

    rng = random.Random(seed)
    counters = {"put": 0, "mput": 0, "get": 0, "has": 0, "delete": 0, "flush": 0, "mget": 0, "not_found": 0,
                "mismatches": 0, "errors": 0}
    problems: list[str] = []
    model: dict[bytes, bytes | None] = {}
    clients = [AsyncClient(sock, timeout=30) for _ in range(conns)]
    for c in clients:
        await c.connect()
    while not start_evt.is_set():  # all connections of all processes open, then go together
        await asyncio.sleep(0.01)
    deadline = time.monotonic() + seconds

    def mismatch(key: bytes, what: str) -> None:
        counters["mismatches"] += 1
        if len(problems) < 20:
            problems.append(f"{key!r}: {what}")

    async def task(c: AsyncClient, keys: list[bytes], trng: random.Random) -> None:
        for k in keys:
            model[k] = None
        while time.monotonic() < deadline:
            r = trng.random()
            key = trng.choice(keys)
            try:
                if r < 0.40:
                    value = trng.randbytes(_size(trng))
                    await c.put(key, value, sync=r < 0.12)
                    model[key] = blake3.blake3(value).digest()
                    counters["put"] += 1
                elif r < 0.45:
                    batch = {k: trng.randbytes(_size(trng)) for k in trng.sample(keys, 3)}
                    await c.put_many(batch, sync=trng.random() < 0.3)
                    for k, v in batch.items():
                        model[k] = blake3.blake3(v).digest()
                    counters["mput"] += 1
                elif r < 0.72:
                    counters["get"] += 1
                    try:
                        got = blake3.blake3(await c.get(key)).digest()
                    except NotFound:
                        counters["not_found"] += 1
                        got = None
                    if got != model[key]:
                        mismatch(key, f"get returned {got.hex()[:12] if got else 'absent'}, "
                                      f"expected {model[key].hex()[:12] if model[key] else 'absent'}")
                elif r < 0.78:
                    counters["has"] += 1
                    if await c.has(key) != (model[key] is not None):
                        mismatch(key, "has() disagrees with the model")
                elif r < 0.84:
                    counters["mget"] += 1
                    some = trng.sample(keys, 3)
                    for k, v in zip(some, await c.get_many(some)):
                        if (blake3.blake3(v).digest() if v is not None else None) != model[k]:
                            mismatch(k, "get_many returned the wrong value")
                elif r < 0.96:
                    await c.delete(key, sync=trng.random() < 0.3)
                    model[key] = None
                    counters["delete"] += 1
                else:
                    await c.flush()
                    counters["flush"] += 1
            except RingblobError as exc:
                counters["errors"] += 1
                if len(problems) < 20:
                    problems.append(f"{key!r}: {type(exc).__name__}: {exc}")
                if not isinstance(exc, NotFound):
                    return

    tasks = []
    for ci, c in enumerate(clients):
        for t in range(TASKS_PER_CONN):
            keys = [b"p%d-c%d-t%d-k%d" % (pid, ci, t, i) for i in range(KEYS_PER_TASK)]
            tasks.append(task(c, keys, random.Random(rng.random())))
    await asyncio.gather(*tasks)
    for c in clients:
        await c.close()
    return {"counters": counters, "problems": problems, "model": model}


# -- the parent ------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """The VmRSS of process ``pid`` in bytes (from /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def fd_count(pid: int) -> int:
    """How many file descriptors process ``pid`` has open (entries of /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def _sleep_then(seconds: float, fn, *args):
    time.sleep(seconds)
    return fn(*args)


def _metrics_url(daemon, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"metrics\s+(http://\S+/metrics)", daemon.output())
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise AssertionError(f"the daemon printed no metrics URL:\n{daemon.output()}")


def _wait_idle(url: str, timeout: float = 10.0) -> dict:
    """Scrape until the daemon reports no open client connection and nothing in flight."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if m.get(("ringblob_connections", ()), 0) == 0 and m.get(("ringblob_requests_in_flight", ()), 0) == 0:
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.05)


@dataclass
class SoakResult:
    """What a soak run measured; ``violations`` empty means every check held."""

    seconds: float = 0.0
    connections: int = 0
    requests: int = 0
    client_ops: dict = field(default_factory=dict)
    keys_verified: int = 0
    acknowledged_lost: int = 0
    wrong_bytes: int = 0
    crashes: int = 0
    rss_samples: list = field(default_factory=list)
    rss_first_max: int = 0
    rss_last_max: int = 0
    fds_before: int = 0
    fds_after: int = 0
    error_statuses: dict = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)


def run(seconds: float = 10.0, *, procs: int = 2, conns: int = 32, seed: int = 0, engine: str = "auto",
        size: str = "128M") -> SoakResult:
    """One soak run of ``seconds`` with ``procs`` x ``conns`` connections; see the module docstring."""
    from ringblob import Client
    from ringblob.errors import NotFound, RingblobError
    from conftest import Daemon, make_tmp

    res = SoakResult(connections=procs * conns)
    rng = random.Random(seed)
    wd = make_tmp(f"soak-{seed}-")
    daemon = Daemon(wd, "--engine", engine, "--metrics-addr", "127.0.0.1:0", size=size)
    ctx = mp.get_context("spawn")
    res_q = ctx.Queue()
    start_evt = ctx.Event()
    workers = []
    try:
        daemon.start()
        dpid = daemon.proc.pid
        url = _metrics_url(daemon)
        _wait_idle(url)
        # the lowest count over a moment: the HTTP connection of the last scrape may still be closing
        res.fds_before = min(_sleep_then(0.05, fd_count, dpid) for _ in range(6))
        before = scrape(url)
        for p in range(procs):
            w = ctx.Process(target=_client_main, args=(p, str(daemon.socket), conns, seconds, rng.randrange(1 << 30), start_evt, res_q),
                            daemon=True)
            w.start()
            workers.append(w)
        # all connections open before the clock starts
        deadline = time.monotonic() + 60
        while scrape(url).get(("ringblob_connections", ()), 0) < procs * conns and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        start_evt.set()
        results = {}
        while len(results) < procs:
            res.rss_samples.append(rss_bytes(dpid))
            try:
                tag, p, out = res_q.get(timeout=0.2)
            except queue.Empty:
                if daemon.proc.poll() is not None:
                    res.crashes += 1
                    res.violations.append(f"the daemon died during the soak ({daemon.proc.returncode}):\n{daemon.output()[-2000:]}")
                    return res
                dead = [i for i, w in enumerate(workers) if w.exitcode is not None and i not in results]
                if dead and res_q.empty():
                    time.sleep(0.5)  # its last message may still be in the pipe
                    if res_q.empty():
                        res.violations.append(f"client process(es) {dead} exited without a result "
                                              f"(exit codes {[workers[i].exitcode for i in dead]})")
                        return res
                if time.monotonic() - t0 > seconds + 120:
                    res.violations.append("client processes did not finish within 120 s of the deadline")
                    return res
                continue
            if tag != "done":
                res.violations.append(f"client process {p} failed: {out}")
                results[p] = None
            else:
                results[p] = out
        res.seconds = time.monotonic() - t0
        for w in workers:
            w.join(30)

        # every key verifies against the model
        models: dict[bytes, bytes | None] = {}
        not_found = 0
        for out in results.values():
            if out is None:
                continue
            models.update(out["model"])
            for k, v in out["counters"].items():
                res.client_ops[k] = res.client_ops.get(k, 0) + v
            not_found += out["counters"]["not_found"]
            for pr in out["problems"]:
                res.violations.append(f"client: {pr}")
            res.wrong_bytes += out["counters"]["mismatches"]
            if out["counters"]["errors"]:
                res.violations.append(f"clients saw {out['counters']['errors']} unexpected errors")
        with Client(daemon.socket, timeout=30) as c:
            for key, want in models.items():
                res.keys_verified += 1
                try:
                    got = blake3.blake3(c.get(key)).digest()
                except NotFound:
                    got = None
                    not_found += 1
                except RingblobError as exc:
                    res.wrong_bytes += 1
                    res.violations.append(f"verify {key!r}: {type(exc).__name__}: {exc}")
                    continue
                if got != want:
                    if got is None:
                        res.acknowledged_lost += 1
                    else:
                        res.wrong_bytes += 1
                    res.violations.append(f"verify {key!r}: read {got.hex()[:12] if got else 'absent'}, "
                                          f"expected {want.hex()[:12] if want else 'absent'}")
            extra = set(c.list()) - set(models)
            if extra:
                res.wrong_bytes += len(extra)
                res.violations.append(f"list() names keys no client put: {sorted(extra)[:5]}")

        # file descriptors back to the idle count once every client closed
        after = _wait_idle(url)
        fd_deadline = time.monotonic() + 10
        while True:
            res.fds_after = fd_count(dpid)
            if res.fds_after <= res.fds_before or time.monotonic() > fd_deadline:
                break
            time.sleep(0.1)
        if res.fds_after > res.fds_before:
            res.violations.append(f"file descriptors leaked: {res.fds_before} open before the soak, {res.fds_after} after "
                                  f"every client closed: {sorted(os.listdir(f'/proc/{dpid}/fd'))}")
        if after.get(("ringblob_connections", ()), 0) != 0:
            res.violations.append(f"ringblob_connections is {after.get(('ringblob_connections', ()))} after every client closed")

        # error counters
        for (name, labels), v in after.items():
            if name != "ringblob_requests_total":
                continue
            lab = dict(labels)
            served = v - before.get((name, labels), 0)
            res.requests += int(served)
            if lab.get("status") != "ok" and served:
                res.error_statuses[f"{lab.get('op')}/{lab.get('status')}"] = int(served)
        provoked = {"get/not_found": not_found} if not_found else {}
        if res.error_statuses != provoked:
            res.violations.append(f"requests with a non-ok status: {res.error_statuses}; only the not_found gets the "
                                  f"clients saw were expected: {provoked}")
        for name in ("ringblob_checksum_failures_total", "ringblob_read_only"):
            if after.get((name, ()), 0) != 0:
                res.violations.append(f"{name} is {after[(name, ())]} after the soak (must be 0)")
        rejected = {k: v for k, v in after.items() if k[0] in ("ringblob_connections_rejected_total", "ringblob_rejected_frames_total") and v}
        if rejected:
            res.violations.append(f"connections or frames were rejected: {rejected}")

        # memory: bounded, not growing
        s = res.rss_samples
        third = max(1, len(s) // 3)
        res.rss_first_max, res.rss_last_max = max(s[:third]), max(s[-third:])
        if res.rss_last_max > res.rss_first_max * RSS_GROWTH_FACTOR + RSS_GROWTH_SLACK:
            res.violations.append(f"the daemon's RSS kept growing: first third peaked at {res.rss_first_max >> 20} MiB, "
                                  f"last third at {res.rss_last_max >> 20} MiB")
        if max(s) > RSS_CAP:
            res.violations.append(f"the daemon's RSS reached {max(s) >> 20} MiB (cap {RSS_CAP >> 20} MiB)")

        rc = daemon.stop()
        if rc != 0:
            res.crashes += 1
            res.violations.append(f"SIGTERM after the soak: the daemon exited with {rc}:\n{daemon.output()[-2000:]}")
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join()
        daemon.kill()
        fh = getattr(daemon, "_logfh", None)
        if fh is not None:
            fh.close()
        res_q.close()
        if not res.violations:
            shutil.rmtree(wd, ignore_errors=True)
        else:
            res.violations.append(f"(files kept in {wd})")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="ringblob load and soak: >= 64 connections, mixed ops, then every check")
    ap.add_argument("--seconds", type=float, default=180.0, help="load duration in seconds (default 180)")
    ap.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--conns", type=int, default=32, help="connections per client process (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", default="auto", help="daemon engine: auto, uring or psync")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    res = run(args.seconds, procs=args.procs, conns=args.conns, seed=args.seed, engine=args.engine)
    for v in res.violations[:20]:
        print(v)
    figures = {
        "suite": "load and soak",
        "count": res.requests,
        "unit": "requests served",
        "acknowledged_lost": res.acknowledged_lost,
        "wrong_bytes": res.wrong_bytes,
        "crashes": res.crashes,
        "seconds": round(time.monotonic() - t0, 1),
        "soak_seconds": round(res.seconds, 1),
        "connections": res.connections,
        "requests_per_second": round(res.requests / res.seconds) if res.seconds else 0,
        "keys_verified": res.keys_verified,
        "rss_first_third_peak_mib": res.rss_first_max >> 20,
        "rss_last_third_peak_mib": res.rss_last_max >> 20,
        "fds_before": res.fds_before,
        "fds_after": res.fds_after,
        "non_ok_statuses": res.error_statuses,
        "client_ops": res.client_ops,
    }
    print("FIGURES " + json.dumps(figures))
    return 1 if res.violations else 0


if __name__ == "__main__":
    sys.exit(main())
