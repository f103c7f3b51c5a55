"""Bad-input suite: a wire-protocol fuzzer against a real daemon process.

One run starts ``ringblob serve`` (the production command) on a data file
under .test-tmp/, opens a long-lived *canary* client connection, then sends
hypothesis-generated inputs, each on a fresh connection:

* valid requests (1 to 3 pipelined frames of every opcode, keys from a small
  pool plus random ones, the empty key, values around ``max_blob_size``,
  VERIFY with right and wrong digests, MPUT/MGET batches, LIST pages);
* the same frames mutated: bit flips, truncation, the ``body_length`` field
  set to anything up to 4 GiB - 1, a changed magic, version, opcode or flags
  word, bytes inserted, deleted or appended;
* random bytes, with and without the magic in front.

After sending an input the client half-closes (``SHUT_WR``) and reads until
the daemon closes; every other input it keeps its side open instead, reads the
replies it expects and closes (an input with a malformed frame must then be
closed by the daemon on its own). The oracle is a model of the store's contents plus the
shared sans-I/O codec run locally over the same bytes: every complete,
well-formed request must get exactly one reply with its id and opcode, and
that reply must be what the model says (the value, ``NotFound``,
``InvalidKey`` for the empty key, ``TooLarge``, ``DigestMismatch``, a LIST
page equal to the model's, ...); a malformed or oversized frame must get one
error frame (status 40 ``ProtocolError`` or 41 ``FrameTooLarge``, a
non-empty UTF-8 message) and then the close; an input that ends mid-frame
gets its complete requests answered and then the close. Error replies carry a
non-empty UTF-8 message. Nothing may hang (a 10 s read timeout is a violation).

Throughout: the daemon process stays alive; every ``canary_every`` inputs the
canary connection puts a fresh key, reads it back, and reads an older one; the
daemon's VmRSS is sampled and may not grow more than ``rss_slack`` bytes over
its level after the warm-up. At the end: every canary key verifies on a new
connection, STAT shows one connection and nothing in flight, the daemon holds
no more file descriptors than after the warm-up, the rejected-frame counters
equal the number of malformed / oversized inputs, and SIGTERM stops the daemon
with status 0.

Run directly for the torture figures: ``python tests/fuzzwire.py --inputs 5000``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import blake3
from hypothesis import HealthCheck, Phase, given, seed as hyp_seed, settings, strategies as st

from ringblob import errors
from ringblob import protocol as P

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from conftest import ROOT, TMP_ROOT, Raw  # noqa: E402  (the shared daemon and raw-socket helpers)
from conftest import NotifyDaemon as Daemon  # noqa: E402

MAX_FRAME = 1 << 20  # the fuzzed daemon's --max-frame-size: lengths past it are FrameTooLarge
MAX_BLOB = 64 << 10  # its --max-blob-size: values past it are TooLarge
STORE_SIZE = 256 << 20
RSS_SLACK = 64 << 20
REPLY_TIMEOUT = 10.0
CANARY_PREFIX = b"canary/"


# -- the daemon: conftest.py's NotifyDaemon, started as `ringblob serve` ---------------------


class ServeDaemon(Daemon):
    """:class:`conftest.NotifyDaemon`, but started with the production command ``ringblob serve``.

    ``nofile``: if given, the daemon's RLIMIT_NOFILE (file descriptors) is set before
    exec: an int sets the soft limit (the hard one is kept), ``(soft, hard)`` both. Readiness is systemd's READY=1 (with the metrics URL),
    as in the parent class. ``rss()`` is VmRSS in bytes, ``fds()`` the number of
    open file descriptors, ``alive()`` whether the process still runs.
    """

    def __init__(self, workdir: str, *args: str, size: str = str(STORE_SIZE),
                 nofile: int | tuple[int, int] | None = None):
        super().__init__(workdir, *args, size=size)
        self.nofile = nofile

    def start(self, wait: bool = True) -> "ServeDaemon":
        env = self._notify_env()
        cmd = [sys.executable, "-m", "ringblob.cli", "serve", "--data", self.data, "--socket", self.sock,
               "--size", self.size, "--metrics-addr", "127.0.0.1:0", *self.args]
        nofile = self.nofile

        def preexec():
            if isinstance(nofile, tuple):
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
            elif nofile is not None:
                _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     preexec_fn=preexec)
        if wait:
            msg = self.wait_notify("READY=1", 60)
            m = re.search(r"metrics on (http://\S+/metrics)", msg)
            self.metrics_url = m.group(1) if m else None
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


def make_workdir(tag: str) -> str:
    """A fresh directory under .test-tmp/ (ext4: O_DIRECT semantics hold)."""
    os.makedirs(TMP_ROOT, exist_ok=True)
    d = os.path.join(TMP_ROOT, f"{tag}-{uuid.uuid4().hex[:8]}")
    os.mkdir(d)
    return d


def raise_nofile(want: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit toward ``want`` (capped by the hard limit); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def exchange(path: str, data: bytes, timeout: float = REPLY_TIMEOUT, *, half_close: bool = True,
             stop_after: int | None = None) -> tuple[list[P.Frame], str | None]:
    """Send ``data`` on a new connection and read replies until the daemon closes.

    With ``half_close`` the client shuts down its sending side after the input
    (the daemon must answer what it got and close); without, the daemon is not
    told the input ended (after a malformed frame it must close by itself).
    ``stop_after=N`` stops reading after N replies instead of at the close. Returns
    ``(frames, problem)``; ``problem`` is ``None`` or says what went wrong on
    the reply side (a hang past ``timeout`` seconds, a partial or undecodable
    reply frame).
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    frames: list[P.Frame] = []
    try:
        try:
            s.connect(path)
        except OSError as exc:
            return frames, f"cannot connect to the daemon: {exc}"
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon closed first (e.g. a bad magic at the start): its replies are still readable
        if half_close:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        dec = P.FrameDecoder(1 << 31)
        while stop_after is None or len(frames) < stop_after:
            try:
                chunk = s.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            except socket.timeout:
                how = "after half-close" if half_close else "(connection left open)"
                return frames, f"no close within {timeout} s {how} ({len(frames)} replies)"
            if not chunk:
                break
            dec.feed(chunk)
            try:
                frames.extend(dec)
            except errors.ProtocolError as exc:
                return frames, f"undecodable reply from the daemon: {exc}"
        if dec.buffered:
            return frames, f"connection closed inside a reply frame ({dec.buffered} bytes of it)"
        return frames, None
    finally:
        s.close()


# -- the oracle ---------------------------------------------------------------------------------

ABSENT = None


def decode_locally(data: bytes, max_frame: int = MAX_FRAME):
    """Run the shared codec over ``data`` as the daemon will.

    Returns ``(requests, error, incomplete)``: the requests parsed before the
    first error, the :class:`~ringblob.errors.ProtocolError` (or ``None``),
    and whether bytes of an unfinished frame remain.
    """
    dec = P.FrameDecoder(max_frame)
    dec.feed(data)
    reqs: list[P.Request] = []
    try:
        while (f := dec.next_frame()) is not None:
            reqs.append(P.parse_request(f))
    except errors.ProtocolError as exc:
        return reqs, exc, False
    return reqs, None, dec.buffered > 0


def _put_status(key: bytes, value: bytes, verify: bool, max_blob: int) -> int:
    if not key:
        return errors.InvalidKey.code
    if len(value) > max_blob:
        return errors.TooLarge.code
    if verify and blake3.blake3(value).digest() != key:
        return errors.DigestMismatch.code
    return 0


def _mput_status(items, max_blob: int) -> int:
    for key, value in items:
        if not key:
            return errors.InvalidKey.code
        if len(value) > max_blob:
            return errors.TooLarge.code
    return 0


def _writes(req: P.Request) -> list[tuple[bytes, bytes | None]]:
    if req.op is P.Op.PUT:
        return [(req.key, req.value)]
    if req.op is P.Op.DELETE:
        return [(req.key, ABSENT)]
    if req.op is P.Op.MPUT:
        return list(req.items or [])
    return []


class Oracle:
    """The model of the store (key -> value) and the reply checks."""

    def __init__(self, max_blob: int = MAX_BLOB, list_page_max: int = 1000):
        self.model: dict[bytes, bytes] = {}
        self.max_blob = max_blob
        self.list_page_max = list_page_max
        self.nospace = 0

    # states a key may be seen in during an input: its state before, plus every write of the input
    def _states(self, key: bytes, cands: dict) -> list:
        return cands.get(key, [self.model.get(key, ABSENT)])

    def check(self, req: P.Request, f: P.Frame, cands: dict, exact: bool) -> str | None:
        """``None`` if ``f`` is an acceptable reply to ``req``, else what is wrong."""
        if (f.opcode, f.request_id) != (req.op, req.request_id):
            return f"reply header op {f.opcode} id {f.request_id} for op {int(req.op)} id {req.request_id}"
        st_, body = f.status, f.body
        if st_ != 0:
            try:
                msg = body.decode("utf-8")
            except UnicodeDecodeError:
                return f"error status {st_} with a non-UTF-8 message {body[:40]!r}"
            if not msg.strip():
                return f"error status {st_} without a message"
        op = req.op

        def want(code: int, alt: tuple = ()) -> str | None:
            if st_ == code or st_ in alt:
                return None
            return f"{op.name} {req.request_id}: status {st_} ({body[:120]!r}), expected {code}"

        if op is P.Op.PUT:
            code = _put_status(req.key, req.value, req.verify, self.max_blob)
            return want(code, (errors.NoSpace.code,) if code == 0 else ())
        if op is P.Op.MPUT:
            code = _mput_status(req.items, self.max_blob)
            return want(code, (errors.NoSpace.code,) if code == 0 else ())
        if op is P.Op.DELETE:
            return want(errors.InvalidKey.code if not req.key else 0)
        if op in (P.Op.GET, P.Op.HAS):
            if not req.key:
                return want(errors.InvalidKey.code)
            states = self._states(req.key, cands)
            if op is P.Op.HAS:
                if st_ != 0 or body not in {b"\x01" if s is not ABSENT else b"\x00" for s in states}:
                    return f"HAS {req.key!r}: status {st_} body {body!r}, states {_fmt_states(states)}"
                return None
            if st_ == 0 and body in [s for s in states if s is not ABSENT]:
                return None
            if st_ == errors.NotFound.code and ABSENT in states:
                return None
            return f"GET {req.key!r}: status {st_} body {body[:60]!r} ({len(body)} bytes), states {_fmt_states(states)}"
        if op is P.Op.MGET:
            if st_ != 0:
                return f"MGET: status {st_} {body[:120]!r}"
            try:
                res = P.decode_mget_reply(body)
            except errors.ProtocolError as exc:
                return f"MGET reply undecodable: {exc}"
            if len(res) != len(req.keys):
                return f"MGET: {len(res)} results for {len(req.keys)} keys"
            for key, r in zip(req.keys, res):
                if not key:
                    if not isinstance(r, errors.InvalidKey):
                        return f"MGET empty key: {r!r}"
                    continue
                states = self._states(key, cands)
                if isinstance(r, errors.NotFound) and ABSENT in states:
                    continue
                if isinstance(r, bytes) and r in [s for s in states if s is not ABSENT]:
                    continue
                return f"MGET {key!r}: {r!r:.80}, states {_fmt_states(states)}"
            return None
        if st_ != 0:
            return f"{op.name} {req.request_id}: status {st_} {body[:120]!r}"
        if op is P.Op.PING:
            return None if body == req.value else f"PING echoed {body[:40]!r}, sent {req.value[:40]!r}"
        if op in (P.Op.FLUSH,):
            return None if body == b"" else f"FLUSH reply body {body[:40]!r}"
        if op is P.Op.NEEDS_FLUSH:
            return None if body in (b"\x00", b"\x01") else f"NEEDS_FLUSH reply body {body[:40]!r}"
        if op is P.Op.STAT:
            try:
                stat = P.decode_stat_reply(body)
            except errors.ProtocolError as exc:
                return f"STAT: {exc}"
            if exact and stat.get("blob_count") != len(self.model):
                return f"STAT blob_count {stat.get('blob_count')}, the model holds {len(self.model)}"
            return None
        if op is P.Op.LIST:
            try:
                keys, more = P.decode_list_reply(body)
            except errors.ProtocolError as exc:
                return f"LIST: {exc}"
            if keys != sorted(keys):
                return f"LIST keys out of order: {keys[:10]!r}"
            if exact:
                match = sorted(k for k in self.model if k.startswith(req.prefix)
                               and (req.start_after is None or k > req.start_after))
                limit = min(req.limit, self.list_page_max) if req.limit else self.list_page_max
                if keys != match[:limit] or more != (len(match) > limit):
                    return (f"LIST prefix {req.prefix!r} after {req.start_after!r} limit {req.limit}: got "
                            f"{len(keys)} keys more={more}, the model has {len(match)}")
            return None
        return f"unexpected op {op!r}"


def _fmt_states(states) -> str:
    return "[" + ", ".join("absent" if s is ABSENT else f"{len(s)} bytes {s[:12]!r}" for s in states) + "]"


@dataclass
class FuzzResult:
    """Outcome of one fuzz run; ``violations`` empty means every check held."""

    inputs: int = 0
    requests: int = 0
    malformed: int = 0
    too_large: int = 0
    incomplete: int = 0
    canary_checks: int = 0
    nospace: int = 0
    rss_baseline: int = 0
    rss_peak: int = 0
    crashes: int = 0
    wrong_bytes: int = 0
    acknowledged_lost: int = 0
    violations: list = field(default_factory=list)
    seconds: float = 0.0


class WireFuzzer:
    """Drives one daemon: :meth:`feed` one input, :meth:`canary_round`, :meth:`finish`."""

    def __init__(self, daemon: ServeDaemon, result: FuzzResult, *, canary_every: int = 25,
                 rss_slack: int = RSS_SLACK, warmup: int = 50):
        self.d = daemon
        self.r = result
        self.oracle = Oracle()
        self.canary = Raw(daemon.sock, timeout=REPLY_TIMEOUT)
        self.canary_vals: dict[bytes, bytes] = {}
        self.canary_every = canary_every
        self.rss_slack = rss_slack
        self.warmup = warmup
        self.fds_baseline = 0
        self.rid = 0
        self.rng = random.Random(1234)

    def _fail(self, what: str, data: bytes | None = None) -> None:
        msg = what if data is None else f"{what}; input ({len(data)} bytes) {data[:200]!r}"
        self.r.violations.append(msg)
        raise AssertionError(msg)

    def _canary_call(self, frame: bytes) -> P.Frame:
        try:
            f = self.canary.call(frame)
        except OSError as exc:
            self._fail(f"canary connection failed: {exc!r}")
        return f

    def canary_round(self) -> None:
        """Put a fresh canary key (sync every other time), read it back and an older one, ping."""
        self.rid += 1
        n = len(self.canary_vals)
        key = CANARY_PREFIX + b"%06d" % n
        val = self.rng.randbytes(self.rng.randrange(0, 9000))
        f = self._canary_call(P.encode_put(self.rid, key, val, sync=n % 2 == 0))
        if f.status != 0:
            self._fail(f"canary PUT {key!r} failed: status {f.status} {f.body[:200]!r}")
        self.canary_vals[key] = val
        self.oracle.model[key] = val
        for k in (key, self.rng.choice(list(self.canary_vals))):
            self.rid += 1
            f = self._canary_call(P.encode_get(self.rid, k))
            if f.status != 0 or f.body != self.canary_vals[k]:
                self.r.wrong_bytes += 1 if f.status == 0 else 0
                self.r.acknowledged_lost += 1 if f.status == errors.NotFound.code else 0
                self._fail(f"canary GET {k!r}: status {f.status}, {len(f.body)} bytes, expected "
                           f"{len(self.canary_vals[k])}")
        self.rid += 1
        f = self._canary_call(P.encode_ping(self.rid, b"canary"))
        if (f.status, f.body) != (0, b"canary"):
            self._fail(f"canary PING: status {f.status} {f.body!r}")
        self.r.canary_checks += 1

    def sample_rss(self) -> None:
        rss = self.d.rss()
        if self.r.inputs <= self.warmup or not self.r.rss_baseline:
            self.r.rss_baseline = max(self.r.rss_baseline, rss)
            self.fds_baseline = max(self.fds_baseline, self.d.fds())
            return
        self.r.rss_peak = max(self.r.rss_peak, rss)
        if rss > self.r.rss_baseline + self.rss_slack:
            self._fail(f"daemon VmRSS {rss >> 20} MiB grew more than {self.rss_slack >> 20} MiB over its "
                       f"{self.r.rss_baseline >> 20} MiB after the warm-up")

    def feed(self, data: bytes) -> None:
        """Send one input on a fresh connection and check the replies against the oracle."""
        r = self.r
        r.inputs += 1
        reqs, err, incomplete = decode_locally(data)
        # independent of the codec: anything not starting with the magic is refused with id 0
        head = data[:4]
        if head and head != P.MAGIC[: len(head)]:
            if reqs or err is None or err.request_id != 0:
                self._fail(f"codec accepted a bad magic {head!r}", data)
        r.requests += len(reqs)
        if isinstance(err, errors.FrameTooLarge):
            r.too_large += 1
        elif err is not None:
            r.malformed += 1
        elif incomplete:
            r.incomplete += 1
        # every other input keeps its side open: the daemon must close by itself after a bad frame
        half_close = r.inputs % 2 == 1
        stop_after = None if half_close or err is not None else len(reqs)
        frames, problem = exchange(self.d.sock, data, half_close=half_close, stop_after=stop_after)
        if not self.d.alive():
            r.crashes += 1
            self._fail(f"daemon died (exit {self.d.proc.returncode}):\n{self.d.output()[-3000:]}", data)
        if problem:
            self._fail(problem, data)
        # the error frame (status 40/41: a valid request's reply never has them)
        errframes = [f for f in frames if f.status in (errors.ProtocolError.code, errors.FrameTooLarge.code)]
        replies = [f for f in frames if f.status not in (errors.ProtocolError.code, errors.FrameTooLarge.code)]
        if err is None and errframes:
            self._fail(f"unexpected error frame {errframes[0]!r:.300}", data)
        if err is not None:
            if len(errframes) != 1:
                self._fail(f"expected one error frame for {err!r}, got {len(errframes)}", data)
            ef = errframes[0]
            want = (err.code, err.request_id, err.opcode if 0 <= err.opcode <= 255 else 0)
            if (ef.status, ef.request_id, ef.opcode) != want:
                self._fail(f"error frame status/id/op {(ef.status, ef.request_id, ef.opcode)}, expected {want}", data)
            try:
                if not ef.body.decode("utf-8").strip():
                    self._fail("error frame without a message", data)
            except UnicodeDecodeError:
                self._fail(f"error frame message is not UTF-8: {ef.body[:60]!r}", data)
        # which keys this input writes: reads of them may see any of the states
        writers = [q for q in reqs if _writes(q)]
        exact = not writers or len(reqs) == 1
        cands: dict[bytes, list] = {}
        if not exact:
            for q in writers:
                for k, v in _writes(q):
                    cands.setdefault(k, [self.oracle.model.get(k, ABSENT)]).append(v)
        pending = list(reqs)
        matched: list[tuple[P.Request, P.Frame]] = []
        for f in replies:
            why = None
            for i, q in enumerate(pending):
                why = self.oracle.check(q, f, cands, exact)
                if why is None:
                    matched.append((q, f))
                    del pending[i]
                    break
            else:
                if f.status == 0 and f.opcode == P.Op.GET:
                    r.wrong_bytes += len(f.body)
                self._fail(f"reply {f.opcode}/{f.request_id} status {f.status} body {f.body[:80]!r} matches no "
                           f"request ({why})", data)
        if pending:
            self._fail(f"{len(pending)} requests never answered: {[(int(q.op), q.request_id) for q in pending]}", data)
        # apply the writes that succeeded
        written: dict[bytes, int] = {}
        for q, f in matched:
            if f.status == errors.NoSpace.code:
                r.nospace += 1
            if f.status != 0:
                continue
            for k, v in _writes(q):
                written[k] = written.get(k, 0) + 1
                if v is ABSENT:
                    self.oracle.model.pop(k, None)
                else:
                    self.oracle.model[k] = v
        for k, n in written.items():
            if n > 1 and not exact:  # concurrent writes of one key in one input: learn the winner
                self.rid += 1
                f = self._canary_call(P.encode_get(self.rid, k))
                got = f.body if f.status == 0 else ABSENT
                if (f.status not in (0, errors.NotFound.code)) or got not in cands[k]:
                    self._fail(f"after concurrent writes {k!r} reads as {f.status} {f.body[:40]!r}, "
                               f"not one of {_fmt_states(cands[k])}", data)
                if got is ABSENT:
                    self.oracle.model.pop(k, None)
                else:
                    self.oracle.model[k] = got
        if r.inputs % self.canary_every == 0:
            self.canary_round()
        if r.inputs % 10 == 0:
            self.sample_rss()

    def finish(self) -> None:
        """End-of-run checks: canary data, STAT, file descriptors, rejected-frame counters, clean stop."""
        r = self.r
        c = Raw(self.d.sock, timeout=REPLY_TIMEOUT)
        for i, (k, v) in enumerate(self.canary_vals.items()):
            f = c.call(P.encode_get(i + 1, k))
            if f.status != 0 or f.body != v:
                r.acknowledged_lost += 1
                self.r.violations.append(f"canary key {k!r} lost or wrong at the end: status {f.status}")
        for k, v in self.oracle.model.items():
            f = c.call(P.encode_get(1, k))
            if f.status != 0 or f.body != v:
                r.acknowledged_lost += 1
                self.r.violations.append(f"acknowledged key {k!r} lost or wrong at the end: status {f.status}")
        stat = P.decode_stat_reply(P.raise_for_status(c.call(P.encode_stat(2))).body)
        if stat["server"]["connections"] != 2 or stat["server"]["in_flight"] != 0:
            self.r.violations.append(f"STAT server {stat['server']}: expected 2 connections, nothing in flight")
        if stat["blob_count"] != len(self.oracle.model):
            self.r.violations.append(f"blob_count {stat['blob_count']} != model {len(self.oracle.model)}")
        c.close()
        self.canary.close()
        deadline = time.monotonic() + 5
        while self.d.fds() > self.fds_baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.fds_baseline and self.d.fds() > self.fds_baseline:
            self.r.violations.append(f"daemon holds {self.d.fds()} fds, {self.fds_baseline} after the warm-up")
        m = self.d.scrape()
        got = (m.get(("ringblob_rejected_frames_total", (("reason", "malformed"),)), 0),
               m.get(("ringblob_rejected_frames_total", (("reason", "too_large"),)), 0))
        if got != (r.malformed, r.too_large):
            self.r.violations.append(f"rejected_frames_total (malformed, too_large) = {got}, "
                                     f"sent {(r.malformed, r.too_large)}")
        r.rss_peak = max(r.rss_peak, self.d.rss())
        rc = self.d.stop()
        if rc != 0:
            r.crashes += 1
            self.r.violations.append(f"daemon exited {rc} on SIGTERM:\n{self.d.output()[-3000:]}")


# -- hypothesis strategies -----------------------------------------------------------------------

KEY_POOL = [b"fz/%d" % i for i in range(12)] + [b"fz/long/" + b"k" * 240, b"\x00\xff" * 4]
ids = st.integers(0, 2**64 - 1) | st.integers(1, 50)


def _short(b: bytes) -> bytes:
    return bytes([len(b)]) + b


keys = st.one_of(
    st.sampled_from(KEY_POOL),
    st.sampled_from(KEY_POOL),
    st.just(b""),
    st.binary(min_size=1, max_size=60).map(lambda b: b"fz/" + b),
)
small_values = st.binary(max_size=300)
values = st.one_of(
    small_values,
    small_values,
    st.tuples(st.integers(0, MAX_BLOB + 100), st.binary(min_size=1, max_size=8)).map(
        lambda t: (t[1] * (t[0] // len(t[1]) + 1))[: t[0]]),
    st.sampled_from([MAX_BLOB, MAX_BLOB + 1]).map(lambda n: b"v" * n),
)


@st.composite
def valid_frame(draw) -> bytes:
    """One well-formed request frame of any opcode (keys may be empty: the store's InvalidKey)."""
    op = draw(st.sampled_from(list(P.Op)))
    rid = draw(ids)
    flags = 0
    if op is P.Op.PUT:
        value = draw(values)
        verify = draw(st.booleans())
        key = draw(keys)
        if verify and draw(st.booleans()):
            key = blake3.blake3(value).digest()
        flags = (P.FLAG_SYNC if draw(st.booleans()) else 0) | (P.FLAG_VERIFY if verify else 0)
        body = _short(key) + value
    elif op in (P.Op.GET, P.Op.HAS):
        body = _short(draw(keys))
    elif op is P.Op.DELETE:
        flags = P.FLAG_SYNC if draw(st.booleans()) else 0
        body = _short(draw(keys))
    elif op is P.Op.LIST:
        prefix = draw(st.sampled_from([b"", b"fz/", b"fz/1", b"canary/", b"zz"]) | st.binary(max_size=4))
        after = draw(st.sampled_from([b""] + KEY_POOL[:4]) | st.binary(max_size=6))
        limit = draw(st.sampled_from([0, 1, 2, 5, 1000, 1001, 2**32 - 1]) | st.integers(0, 2**32 - 1))
        body = _short(prefix) + _short(after) + limit.to_bytes(4, "little")
    elif op is P.Op.PING:
        body = draw(st.binary(max_size=200))
    elif op is P.Op.MPUT:
        items = draw(st.lists(st.tuples(keys, small_values | values), max_size=4))
        flags = P.FLAG_SYNC if draw(st.booleans()) else 0
        body = len(items).to_bytes(4, "little") + b"".join(
            _short(k) + len(v).to_bytes(4, "little") + v for k, v in items)
    elif op is P.Op.MGET:
        ks = draw(st.lists(keys, max_size=6))
        body = len(ks).to_bytes(4, "little") + b"".join(_short(k) for k in ks)
    else:  # FLUSH, STAT, NEEDS_FLUSH
        body = b""
    return P.encode_frame(op, rid, body, flags)


@st.composite
def mutated(draw, data: bytes, starts: list[int]) -> bytes:
    """``data`` (frames beginning at ``starts``) with 1 to 3 mutations."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "length", "magic", "version", "opcode", "flags",
                                     "insert", "delete", "append"]))
        hdr = draw(st.sampled_from(starts)) if starts else 0
        if kind == "flip" and buf:
            pos = draw(st.integers(0, len(buf) - 1))
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate" and buf:
            del buf[draw(st.integers(0, len(buf) - 1)):]
        elif kind == "delete" and buf:
            a = draw(st.integers(0, len(buf) - 1))
            del buf[a: a + draw(st.integers(1, 32))]
        elif kind == "insert":
            pos = draw(st.integers(0, len(buf)))
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "append":
            buf += draw(st.binary(min_size=1, max_size=64) | valid_frame())
        elif len(buf) >= hdr + P.HEADER_SIZE:
            if kind == "length":
                cur = int.from_bytes(buf[hdr + 16: hdr + 20], "little")
                new = draw(st.sampled_from([0xFFFFFFFF, MAX_FRAME - P.HEADER_SIZE, MAX_FRAME - P.HEADER_SIZE + 1,
                                            0x80000000])
                           | st.integers(max(0, cur - 8), cur + 8)
                           | st.integers(0, 0xFFFFFFFF))
                buf[hdr + 16: hdr + 20] = new.to_bytes(4, "little")
            elif kind == "magic":
                buf[hdr: hdr + 4] = draw(st.binary(min_size=4, max_size=4))
            elif kind == "version":
                buf[hdr + 4] = draw(st.integers(0, 255))
            elif kind == "opcode":
                buf[hdr + 5] = draw(st.integers(0, 255))
            elif kind == "flags":
                buf[hdr + 6: hdr + 8] = draw(st.integers(0, 0xFFFF)).to_bytes(2, "little")
    return bytes(buf)


@st.composite
def fuzz_input(draw) -> bytes:
    """One input: valid frames (40%), mutated valid frames (45%), or random bytes (15%)."""
    kind = draw(st.integers(0, 19))
    if kind >= 17:
        return draw(st.binary(min_size=1, max_size=200) | st.binary(max_size=200).map(lambda b: P.MAGIC + b))
    frames = draw(st.lists(valid_frame(), min_size=1, max_size=3))
    data = b"".join(frames)
    if kind < 8:
        return data
    starts, pos = [], 0
    for fr in frames:
        starts.append(pos)
        pos += len(fr)
    return draw(mutated(data, starts))


def run_fuzz(n_inputs: int, *, seed: int | None = 0, canary_every: int = 25, workdir: str | None = None,
             keep: bool = False, loop: str = "auto") -> FuzzResult:
    """Fuzz a fresh ``ringblob serve`` with ``n_inputs`` hypothesis inputs; return the result.

    ``seed`` makes the run reproducible (``None``: random). A violation stops
    the run (hypothesis then shrinks the failing input; the shrunk input's
    message is the last of ``violations``). ``loop`` is the daemon's event loop
    (``auto`` = uvloop when installed, ``asyncio``). The data directory under
    .test-tmp/ is removed unless ``keep``.
    """
    r = FuzzResult()
    t0 = time.monotonic()
    wd = workdir or make_workdir("fuzzwire")
    d = ServeDaemon(wd, "--max-frame-size", str(MAX_FRAME), "--max-blob-size", str(MAX_BLOB),
                    "--buffer-count", "16", "--loop", loop)
    try:
        d.start()
        fz = WireFuzzer(d, r, canary_every=canary_every)
        fz.canary_round()

        @settings(max_examples=n_inputs, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
        @given(fuzz_input())
        def one(data: bytes) -> None:
            if not d.alive():
                raise AssertionError("daemon is dead")
            fz.feed(data)

        if seed is not None:
            one = hyp_seed(seed)(one)
        try:
            one()
        except Exception as exc:  # AssertionError from a check; anything else is a harness failure, reported too
            if not r.violations or str(exc) not in r.violations[-1]:
                r.violations.append(f"{type(exc).__name__}: {exc}"[:2000])
        if d.alive():
            fz.finish()
        else:
            r.crashes = max(r.crashes, 1)
    finally:
        d.kill()
        r.seconds = time.monotonic() - t0
        if not keep and not r.violations:
            shutil.rmtree(wd, ignore_errors=True)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="ringblob wire-protocol fuzzer against a real daemon")
    ap.add_argument("--inputs", type=int, default=5000, help="number of fuzz inputs (default 5000)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0; -1 = random)")
    ap.add_argument("--canary-every", type=int, default=25)
    ap.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"), help="the daemon's event loop")
    args = ap.parse_args(argv)
    r = run_fuzz(args.inputs, seed=None if args.seed < 0 else args.seed, canary_every=args.canary_every,
                 loop=args.loop)
    for v in r.violations[:10]:
        print("VIOLATION:", v[:3000])
    figures = {
        "suite": "wire-protocol fuzzing",
        "count": r.inputs,
        "unit": "fuzz inputs",
        "acknowledged_lost": r.acknowledged_lost,
        "wrong_bytes": r.wrong_bytes,
        "crashes": r.crashes,
        "seconds": round(r.seconds, 1),
        "requests": r.requests,
        "malformed_frames": r.malformed,
        "oversized_frames": r.too_large,
        "truncated_inputs": r.incomplete,
        "canary_checks": r.canary_checks,
        "rss_growth_mib": round(max(0, r.rss_peak - r.rss_baseline) / (1 << 20), 1),
        "violations": len(r.violations),
    }
    print(f"fuzzwire: inputs={r.inputs} requests={r.requests} malformed={r.malformed} too_large={r.too_large} "
          f"truncated={r.incomplete} nospace={r.nospace} canary_checks={r.canary_checks} "
          f"rss_baseline={r.rss_baseline >> 20}MiB rss_peak={r.rss_peak >> 20}MiB seconds={r.seconds:.1f}")
    print("FIGURES " + json.dumps(figures))
    return 1 if (r.violations or r.crashes or r.acknowledged_lost or r.wrong_bytes) else 0


if __name__ == "__main__":
    sys.exit(main())
