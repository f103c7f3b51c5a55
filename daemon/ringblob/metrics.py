"""Prometheus metrics of the ringblob daemon.

One :class:`Metrics` object per server, with its own
``prometheus_client.CollectorRegistry`` (tests run several servers in one
process). It plays two roles:

* **store observer**: pass it as ``BlobStore.open(..., observer=metrics)``;
  the store calls ``on_fdatasync(seconds)``, ``on_group_commit(batch_size)``,
  ``on_flush_skipped()``, ``on_checksum_failure(key)``,
  ``on_read_only(reason)`` and ``on_checkpoint(seconds)`` as events happen
  (histograms of durations and batch sizes come from these);
* **scrape-time collector**: after :meth:`Metrics.attach_store`, every
  scrape reads ``store.stat()`` once and exports the store's gauges and
  counters (blobs, used/free bytes, journal bytes, checkpoints, SQEs, CQEs,
  fdatasyncs, bytes read/written, ...). Scrapes run on the event loop (see
  :func:`serve_metrics`), so ``stat()`` is never called from another thread.

The server records requests (:meth:`observe_request`), connections, frames
rejected and bytes on the socket. The per-request series (requests, their
latency, requests in flight, bytes received and sent) are counted in plain
Python ints and lists on the hot path — no lock per request, as a
``prometheus_client`` ``Counter.inc`` takes — and handed to
``prometheus_client`` at scrape time by a collector; their names, types,
labels and values are those of the ``Counter``/``Histogram``/``Gauge`` they
replace (``_created`` samples included). So are the group commit's two
histograms (``ringblob_fdatasync_duration_seconds``,
``ringblob_group_commit_batch_size``), observed once per commit round. The
rest are ``prometheus_client`` objects (they change rarely).

Every series (all names ``ringblob_``-prefixed, base units)::

  ringblob_requests_total{op,status}            requests answered; status "ok" or the error (e.g. "not_found")
  ringblob_request_duration_seconds{op}         histogram: request received -> reply queued
  ringblob_requests_in_flight                   requests being served now
  ringblob_connections                          client connections open
  ringblob_connections_accepted_total           connections accepted
  ringblob_connections_rejected_total{reason}   "busy" (max_connections), "access_denied" (SO_PEERCRED)
  ringblob_rejected_frames_total{reason}        "malformed", "too_large"
  ringblob_received_bytes_total                 bytes read from client sockets
  ringblob_sent_bytes_total                     bytes written to client sockets
  ringblob_read_bytes_total                     bytes the store read from the medium
  ringblob_written_bytes_total                  bytes the store wrote to the medium
  ringblob_fdatasync_total                      fdatasync calls
  ringblob_fdatasync_duration_seconds           histogram of fdatasync latency
  ringblob_flush_skipped_total                  flushes skipped because needs_flush was false
  ringblob_group_commits_total                  group commits (one fdatasync for a batch of sync writes)
  ringblob_group_commit_batch_size              histogram of sync requests per group commit
  ringblob_sqes_submitted_total                 SQEs submitted to the ring
  ringblob_cqes_reaped_total                    CQEs reaped from the ring
  ringblob_ring_enters_total                    io_uring_enter calls (submit syscalls)
  ringblob_engine_in_flight                     engine operations submitted and not yet reaped
  ringblob_journal_bytes                        bytes of journal since the last checkpoint
  ringblob_checkpoints_total                    checkpoints written
  ringblob_checkpoint_duration_seconds          histogram of checkpoint duration
  ringblob_blobs                                blobs stored
  ringblob_used_bytes / ringblob_free_bytes     data pages in use / free, in bytes
  ringblob_largest_free_bytes                   the largest free extent: the largest value a put can store now
  ringblob_fragmentation_ratio                  1 - largest free extent / free bytes (0..1)
  ringblob_checksum_failures_total              blobs whose bytes failed their BLAKE3 digest
  ringblob_values_leased_total                  large PUT values received straight into fixed buffers
  ringblob_values_streamed_total                of those, values written buffer by buffer as they arrived
  ringblob_values_lease_refused_total           large PUT values that took the copying path instead
  ringblob_receive_buffers_held                 fixed buffers such values hold now
  ringblob_read_only                            1 when the store turned read-only after an I/O error
  ringblob_needs_flush                          1 when acknowledged writes await a flush
  ringblob_store_up                             1 when the last stat() succeeded
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import re
import time
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

try:  # the hot-path counters as C fields, updated by the server's request path with no lookup
    from ._srvcore import NetCounters as _NetCounters
except ImportError:  # the extensions are not built: plain attributes (the server needs them anyway)
    _NetCounters = object

__all__ = ["Metrics", "serve_metrics", "status_label"]

log = logging.getLogger("ringblob.metrics")

_LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LATENCY_BOUNDS = _LATENCY_BUCKETS + (float("inf"),)  # a request's bucket: bisect_left (le is inclusive)
_LATENCY_LE = tuple(floatToGoString(b) for b in _LATENCY_BOUNDS)
_NBUCKETS = len(_LATENCY_BOUNDS)
_BATCH_BOUNDS = tuple(float(b) for b in _BATCH_BUCKETS) + (float("inf"),)
_BATCH_LE = tuple(floatToGoString(b) for b in _BATCH_BOUNDS)
_NBATCH = len(_BATCH_BOUNDS)
_OPS = ("put", "get", "has", "delete", "list", "flush", "stat", "ping", "mput", "mget", "needs_flush")
_bisect_left = bisect.bisect_left
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def status_label(status: int | BaseException | None) -> str:
    """The ``status`` label of a request: ``"ok"`` or the error class in snake case (``"not_found"``)."""
    if status is None or status == 0:
        return "ok"
    if isinstance(status, BaseException):
        from .errors import RingblobError

        if isinstance(status, RingblobError):
            return _CAMEL.sub("_", type(status).__name__).lower()
        if isinstance(status, OSError):
            return "io_failed"
        return "internal_error"
    from .errors import error_for_code

    cls = error_for_code(int(status))
    if cls.code != status:
        return f"status_{status}"
    return "internal_error" if cls.__name__ == "RingblobError" else _CAMEL.sub("_", cls.__name__).lower()


def _num(*candidates: Any, default: float | None = None) -> float | None:
    for c in candidates:
        if isinstance(c, bool):
            return float(c)
        if isinstance(c, (int, float)):
            return float(c)
    return default


class Metrics(_NetCounters):
    """The daemon's metrics in a private registry (``self.registry``); also the store observer.

    Hot-path counters, plain ints the server updates directly (exported at
    scrape time): ``requests_in_flight`` (``ringblob_requests_in_flight``),
    ``bytes_received`` (``ringblob_received_bytes_total``, bytes),
    ``bytes_sent`` (``ringblob_sent_bytes_total``, bytes); requests and their
    latency go through :meth:`observe_request` (read back with
    :meth:`request_count`). Use them from the event loop's thread only. The three
    counters are C fields of the base class (``ringblob._srvcore.NetCounters``, 64-bit)
    where the extensions are built.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.requests_in_flight = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        now = time.time()
        self._created = now  # of the unlabelled hot counters
        self._req_counts: dict[tuple[str, int], int] = {}  # (op, status code) -> requests answered
        self._req_created: dict[tuple[str, str], float] = {}  # (op, status label) -> first seen (unix time)
        self._durations: dict[str, list] = {}  # op -> [count per bucket (non-cumulative)..., sum of seconds]
        self._dur_created: dict[str, float] = {}
        for op in _OPS:
            self._req_counts[(op, 0)] = 0
            self._req_created[(op, "ok")] = now
            self._durations[op] = [0] * _NBUCKETS + [0.0]
            self._dur_created[op] = now
        r.register(_RequestCollector(self))
        self.connections = Gauge("ringblob_connections", "Client connections open", registry=r)
        self.connections_accepted = Counter("ringblob_connections_accepted", "Client connections accepted", registry=r)
        self.connections_rejected = Counter(
            "ringblob_connections_rejected", "Client connections refused, by reason (busy, access_denied)", ["reason"], registry=r
        )
        self.rejected_frames = Counter(
            "ringblob_rejected_frames", "Frames refused (connection closed), by reason (malformed, too_large)", ["reason"], registry=r
        )
        # the group commit's histograms, observed once per commit round: plain lists (as the
        # request durations), handed over at scrape time
        self._fsync_h = [0] * _NBUCKETS + [0.0]  # count per bucket (non-cumulative)..., sum of seconds
        self._batch_h = [0] * _NBATCH + [0]  # count per bucket (non-cumulative)..., sum of requests
        r.register(_CommitCollector(self))
        self.checkpoint_duration = Histogram(
            "ringblob_checkpoint_duration_seconds", "Checkpoint duration in seconds", buckets=_LATENCY_BUCKETS, registry=r
        )
        for reason in ("malformed", "too_large"):
            self.rejected_frames.labels(reason)
        for reason in ("busy", "access_denied"):
            self.connections_rejected.labels(reason)
        # event counts, used where store.stat() does not carry the counter
        self.events = {"fdatasyncs": 0, "group_commits": 0, "flushes_skipped": 0, "checksum_failures": 0, "checkpoints": 0}
        self.read_only_reason: str | None = None
        self._store: Any = None
        self._stat_error_logged = False
        r.register(_StoreCollector(self))

    # -- wiring ------------------------------------------------------------------------

    def attach_store(self, store: Any) -> None:
        """Export ``store.stat()`` at every scrape from now on."""
        self._store = store

    def detach_store(self) -> None:
        """Stop reading the store (before it is closed)."""
        self._store = None

    # -- server events ---------------------------------------------------------------

    def observe_request(self, op: str, status: int, seconds: float) -> None:
        """Count one answered request (``op``: lower-case name, ``status``: 0 or an error code)
        and its latency (seconds) in ``ringblob_requests_total`` / ``ringblob_request_duration_seconds``."""
        key = (op, status)
        counts = self._req_counts
        if key in counts:
            counts[key] += 1
        else:
            counts[key] = 1
            self._req_created.setdefault((op, status_label(status)), time.time())
        h = self._durations.get(op)
        if h is None:
            h = self._durations[op] = [0] * _NBUCKETS + [0.0]
            self._dur_created[op] = time.time()
        h[_bisect_left(_LATENCY_BOUNDS, seconds)] += 1
        h[_NBUCKETS] += seconds

    def request_count(self, op: str, status: str = "ok") -> int:
        """Requests answered so far with ``op`` (``"get"``) and ``status`` label (``"ok"``, ``"not_found"``)."""
        return sum(n for (o, code), n in self._req_counts.items() if o == op and status_label(code) == status)

    # -- store observer hooks -----------------------------------------------------------

    def on_fdatasync(self, seconds: float) -> None:
        """One fdatasync completed after ``seconds``."""
        self.events["fdatasyncs"] += 1
        h = self._fsync_h
        h[_bisect_left(_LATENCY_BOUNDS, seconds)] += 1
        h[_NBUCKETS] += seconds

    def on_group_commit(self, batch_size: int) -> None:
        """One group commit made ``batch_size`` sync requests durable."""
        self.events["group_commits"] += 1
        h = self._batch_h
        h[_bisect_left(_BATCH_BOUNDS, batch_size)] += 1
        h[_NBATCH] += batch_size

    def on_flush_skipped(self) -> None:
        """A flush returned without a syscall because needs_flush was false."""
        self.events["flushes_skipped"] += 1

    def on_checksum_failure(self, key: bytes | None = None) -> None:
        """A blob's bytes failed their BLAKE3 digest."""
        self.events["checksum_failures"] += 1
        log.warning("checksum failure on key %r", key)

    def on_read_only(self, reason: str = "") -> None:
        """The store turned read-only (after EIO)."""
        self.read_only_reason = str(reason)

    def on_checkpoint(self, seconds: float) -> None:
        """A checkpoint was written in ``seconds``."""
        self.events["checkpoints"] += 1
        self.checkpoint_duration.observe(seconds)

    # -- exposition --------------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format of every series (what /metrics returns)."""
        return generate_latest(self.registry)

    def _store_stat(self) -> dict | None:
        store = self._store
        if store is None:
            return None
        try:
            st = store.stat()
        except Exception as exc:  # a scrape must not take the daemon down
            if not self._stat_error_logged:
                log.warning("metrics: store.stat() failed: %s", exc)
                self._stat_error_logged = True
            return None
        return st if isinstance(st, dict) else None


class _Collector:
    """A ``prometheus_client`` collector over one :class:`Metrics` (``self.m``), read at scrape time."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self) -> Iterable:
        return []


def _cumulative(les: tuple, h: list) -> list[tuple[str, float]]:
    """``(le, cumulative count)`` per bucket from ``h`` (count per bucket, non-cumulative)."""
    acc = 0
    out = []
    for le, n in zip(les, h):
        acc += n
        out.append((le, float(acc)))
    return out


class _RequestCollector(_Collector):
    """Hands the per-request counters, kept in plain Python by :class:`Metrics`, to
    ``prometheus_client`` at scrape time, as the ``Counter``/``Histogram``/``Gauge`` they replace."""

    def collect(self) -> Iterable:
        m = self.m
        req = CounterMetricFamily("ringblob_requests", "Requests answered, by operation and status",
                                  labels=["op", "status"])
        by_label: dict[tuple[str, str], int] = {}
        for (op, code), n in list(m._req_counts.items()):
            k = (op, status_label(code))
            by_label[k] = by_label.get(k, 0) + n
        for (op, label), n in by_label.items():
            req.add_metric([op, label], float(n), created=m._req_created.get((op, label), m._created))
        yield req
        dur = HistogramMetricFamily(
            "ringblob_request_duration_seconds",
            "Request latency (frame decoded to reply queued) in seconds, by operation", labels=["op"],
        )
        for op, h in list(m._durations.items()):
            dur.add_metric([op], _cumulative(_LATENCY_LE, h), float(h[_NBUCKETS]))
            dur.samples.append(Sample("ringblob_request_duration_seconds_created", {"op": op},
                                      m._dur_created.get(op, m._created)))
        yield dur
        g = GaugeMetricFamily("ringblob_requests_in_flight", "Requests being served now")
        g.add_metric([], float(m.requests_in_flight))
        yield g
        yield CounterMetricFamily("ringblob_received_bytes", "Bytes read from client sockets",
                                  value=float(m.bytes_received), created=m._created)
        yield CounterMetricFamily("ringblob_sent_bytes", "Bytes written to client sockets",
                                  value=float(m.bytes_sent), created=m._created)


def _histogram(name: str, doc: str, h: list, les: tuple, created: float) -> HistogramMetricFamily:
    """A label-less histogram family from ``h`` (count per bucket, non-cumulative, then the sum),
    with its ``_created`` sample, as a ``prometheus_client`` ``Histogram`` exports it."""
    fam = HistogramMetricFamily(name, doc)
    fam.add_metric([], _cumulative(les, h), float(h[-1]))
    fam.samples.append(Sample(name + "_created", {}, created))
    return fam


class _CommitCollector(_Collector):
    """Hands the group commit's histograms (fdatasync latency, sync requests per group commit),
    kept in plain Python by :class:`Metrics`, to ``prometheus_client`` at scrape time, as the
    ``Histogram`` objects they replace."""

    def collect(self) -> Iterable:
        m = self.m
        yield _histogram("ringblob_fdatasync_duration_seconds", "fdatasync latency in seconds", list(m._fsync_h),
                         _LATENCY_LE, m._created)
        yield _histogram("ringblob_group_commit_batch_size",
                         "Sync requests made durable by one group commit (one fdatasync)", list(m._batch_h),
                         _BATCH_LE, m._created)


class _StoreCollector(_Collector):
    """Reads ``store.stat()`` once per scrape and yields the store's series."""

    def collect(self) -> Iterable:
        m = self.m
        st = m._store_stat()
        up = GaugeMetricFamily("ringblob_store_up", "1 when the last store.stat() at scrape time succeeded")
        up.add_metric([], 1.0 if st is not None else 0.0)
        yield up
        st = st or {}
        # the store's counters: flat in stat() or nested under "counters"; the engine's
        # under "engine_counters" (or "counters"/"engine" as a dict)
        nested = st.get("counters")
        c = dict(st)
        if isinstance(nested, dict):
            c.update(nested)
        eng: dict = {}
        for cand in (st.get("engine_counters"), c.get("engine"), st.get("engine")):
            if isinstance(cand, dict):
                eng = cand
                break
        ev = m.events

        def counter(name: str, doc: str, *values: Any) -> CounterMetricFamily | None:
            v = _num(*values)
            if v is None:
                return None
            return CounterMetricFamily(name, doc, value=v)

        def gauge(name: str, doc: str, *values: Any) -> GaugeMetricFamily | None:
            v = _num(*values)
            if v is None:
                return None
            return GaugeMetricFamily(name, doc, value=v)

        families = [
            counter("ringblob_read_bytes", "Bytes the store read from the medium", c.get("bytes_read"), st.get("bytes_read")),
            counter("ringblob_written_bytes", "Bytes the store wrote to the medium", c.get("bytes_written"), st.get("bytes_written")),
            counter("ringblob_fdatasync", "fdatasync calls", c.get("fdatasyncs"), ev["fdatasyncs"]),
            counter("ringblob_flush_skipped", "Flushes skipped because needs_flush was false", c.get("flushes_skipped"), ev["flushes_skipped"]),
            counter("ringblob_group_commits", "Group commits (one fdatasync, or one round of RWF_DSYNC writes, shared by a batch of sync writes)", c.get("group_commits"), ev["group_commits"]),
            counter("ringblob_dsync_commits", "Group commits made durable by RWF_DSYNC writes instead of an fdatasync", c.get("dsync_commits")),
            counter("ringblob_checksum_failures", "Blobs whose bytes failed their BLAKE3 digest", c.get("checksum_failures"), ev["checksum_failures"]),
            counter("ringblob_checkpoints", "Checkpoints written", st.get("checkpoints"), c.get("checkpoints"), ev["checkpoints"]),
            counter("ringblob_sqes_submitted", "SQEs submitted to the ring", eng.get("sqes"), c.get("sqes"), 0),
            counter("ringblob_cqes_reaped", "CQEs reaped from the ring", eng.get("cqes"), c.get("cqes"), 0),
            counter("ringblob_ring_enters", "io_uring_enter calls (submission syscalls)", eng.get("enters"), c.get("enters"), 0),
            gauge("ringblob_engine_in_flight", "Engine operations submitted and not yet reaped", eng.get("in_flight"), st.get("engine_in_flight")),
            gauge("ringblob_journal_bytes", "Bytes of journal written since the last checkpoint", st.get("journal_bytes")),
            gauge("ringblob_blobs", "Blobs stored", st.get("blob_count")),
            gauge("ringblob_used_bytes", "Bytes of data pages in use", st.get("used_bytes")),
            gauge("ringblob_free_bytes", "Bytes of data pages free", st.get("free_bytes")),
            gauge("ringblob_largest_free_bytes", "Bytes in the largest free extent: the largest value a put can store now",
                  st.get("largest_free_bytes")),
            gauge("ringblob_fragmentation_ratio", "1 - largest free extent / free bytes (0..1)", st.get("fragmentation")),
            gauge("ringblob_read_only", "1 when the store turned read-only after an I/O error", st.get("read_only"), 1 if m.read_only_reason else 0),
            gauge("ringblob_needs_flush", "1 when acknowledged writes await a flush", st.get("needs_flush"), 0),
            counter("ringblob_values_leased", "Large PUT values received straight into fixed buffers (no copy)",
                    c.get("values_leased")),
            counter("ringblob_values_streamed", "Large PUT values written buffer by buffer as they arrived",
                    c.get("values_streamed")),
            counter("ringblob_values_lease_refused", "Large PUT values that took the copying receive path "
                    "(buffers at their cap of half the pool, or the pool short)", c.get("lease_value_refused")),
            gauge("ringblob_receive_buffers_held", "Fixed buffers that large PUT values being received hold now",
                  st.get("receive_buffers_held")),
        ]
        for fam in families:
            if fam is not None:
                yield fam


async def serve_metrics(metrics: Metrics, host: str, port: int) -> asyncio.AbstractServer:
    """Serve ``GET /metrics`` over HTTP/1.0 on ``host:port`` from the running event loop.

    Returns the ``asyncio`` server (close it to stop). Rendering happens on
    the loop, so the store is only touched from its own thread. Raises
    ``OSError`` when the address cannot be bound (e.g. EADDRINUSE).
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            path = path.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"only GET\n"
            elif path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, metrics.render()
            elif path == "/":
                status, ctype, body = "200 OK", "text/html", b'<html><body><a href="/metrics">/metrics</a></body></html>\n'
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found; try /metrics\n"
            hdr = f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(hdr.encode("latin-1"))
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:  # never let a scrape kill the loop
            log.exception("metrics: scrape failed")
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, limit=16384)
