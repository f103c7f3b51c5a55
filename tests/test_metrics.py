"""Unit tests of ringblob.metrics: names, the store collector, the observer hooks, the HTTP endpoint."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from ringblob import errors
from ringblob.metrics import Metrics, serve_metrics, status_label


def samples(m: Metrics) -> dict:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class StatStore:
    def __init__(self, stat):
        self._stat = stat

    def stat(self):
        if isinstance(self._stat, Exception):
            raise self._stat
        return self._stat


FULL_STAT = {
    "blob_count": 12,
    "used_bytes": 49152,
    "free_bytes": 1 << 20,
    "largest_free_bytes": 1 << 18,
    "journal_bytes": 8192,
    "checkpoints": 3,
    "fragmentation": 0.25,
    "read_only": True,
    "needs_flush": False,
    "receive_buffers_held": 5,
    "counters": {
        "values_leased": 9,
        "lease_value_refused": 2,
        "fdatasyncs": 7,
        "group_commits": 4,
        "dsync_commits": 3,
        "flushes_skipped": 2,
        "checksum_failures": 1,
        "bytes_read": 4096,
        "bytes_written": 65536,
        "engine": {"sqes": 40, "cqes": 39, "enters": 11, "in_flight": 1},
    },
}


def test_store_stat_becomes_series_with_prometheus_names():
    m = Metrics()
    m.attach_store(StatStore(FULL_STAT))
    s = samples(m)
    expect = {
        "ringblob_blobs": 12,
        "ringblob_used_bytes": 49152,
        "ringblob_free_bytes": 1 << 20,
        "ringblob_largest_free_bytes": 1 << 18,
        "ringblob_journal_bytes": 8192,
        "ringblob_checkpoints_total": 3,
        "ringblob_fragmentation_ratio": 0.25,
        "ringblob_read_only": 1,
        "ringblob_needs_flush": 0,
        "ringblob_fdatasync_total": 7,
        "ringblob_group_commits_total": 4,
        "ringblob_dsync_commits_total": 3,
        "ringblob_flush_skipped_total": 2,
        "ringblob_checksum_failures_total": 1,
        "ringblob_read_bytes_total": 4096,
        "ringblob_written_bytes_total": 65536,
        "ringblob_sqes_submitted_total": 40,
        "ringblob_cqes_reaped_total": 39,
        "ringblob_ring_enters_total": 11,
        "ringblob_engine_in_flight": 1,
        "ringblob_values_leased_total": 9,
        "ringblob_values_lease_refused_total": 2,
        "ringblob_receive_buffers_held": 5,
        "ringblob_store_up": 1,
    }
    for name, value in expect.items():
        assert s[(name, ())] == value, name
    for name, _ in s:
        assert name.startswith("ringblob_")


def test_observer_hooks_fill_histograms_and_fallback_counters():
    m = Metrics()
    m.attach_store(StatStore({"blob_count": 0}))  # a stat without counters: events are used
    m.on_fdatasync(0.002)
    m.on_fdatasync(0.004)
    m.on_group_commit(5)
    m.on_flush_skipped()
    m.on_checkpoint(0.01)
    m.on_checksum_failure(b"k")
    m.on_read_only("fdatasync: EIO")
    s = samples(m)
    assert s[("ringblob_fdatasync_duration_seconds_count", ())] == 2
    assert abs(s[("ringblob_fdatasync_duration_seconds_sum", ())] - 0.006) < 1e-9
    assert s[("ringblob_fdatasync_total", ())] == 2
    assert s[("ringblob_group_commit_batch_size_count", ())] == 1
    assert s[("ringblob_group_commit_batch_size_bucket", (("le", "4.0"),))] == 0
    assert s[("ringblob_group_commit_batch_size_bucket", (("le", "8.0"),))] == 1
    assert s[("ringblob_flush_skipped_total", ())] == 1
    assert s[("ringblob_checkpoints_total", ())] == 1
    assert s[("ringblob_checkpoint_duration_seconds_count", ())] == 1
    assert s[("ringblob_checksum_failures_total", ())] == 1
    assert s[("ringblob_read_only", ())] == 1


def test_requests_and_status_labels():
    m = Metrics()
    m.observe_request("get", 0, 0.001)
    m.observe_request("get", errors.NotFound.code, 0.002)
    m.observe_request("put", errors.DigestMismatch.code, 0.003)
    s = samples(m)
    assert s[("ringblob_requests_total", (("op", "get"), ("status", "ok")))] == 1
    assert s[("ringblob_requests_total", (("op", "get"), ("status", "not_found")))] == 1
    assert s[("ringblob_requests_total", (("op", "put"), ("status", "digest_mismatch")))] == 1
    assert s[("ringblob_request_duration_seconds_count", (("op", "get"),))] == 2
    assert status_label(errors.IOFailed.code) == "io_failed"
    assert status_label(1) == "internal_error"
    assert status_label(999) == "status_999"
    assert status_label(errors.FrameTooLarge("x")) == "frame_too_large"


def test_a_failing_stat_does_not_break_the_scrape():
    m = Metrics()
    m.attach_store(StatStore(RuntimeError("boom")))
    s = samples(m)
    assert s[("ringblob_store_up", ())] == 0
    assert ("ringblob_requests_in_flight", ()) in s
    assert ("ringblob_blobs", ()) not in s


def test_registries_are_private_per_server():
    a, b = Metrics(), Metrics()
    a.observe_request("ping", 0, 0.0)
    assert samples(a)[("ringblob_requests_total", (("op", "ping"), ("status", "ok")))] == 1
    assert samples(b)[("ringblob_requests_total", (("op", "ping"), ("status", "ok")))] == 0


def test_http_endpoint_serves_metrics_and_404():
    async def main():
        m = Metrics()
        m.attach_store(StatStore(FULL_STAT))
        srv = await serve_metrics(m, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]

        async def get(path):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            raw = await r.read()
            w.close()
            return raw.partition(b"\r\n\r\n")

        head, _, body = await get("/metrics")
        assert b"200 OK" in head.split(b"\r\n")[0] and b"text/plain" in head
        assert b"ringblob_blobs 12.0" in body
        head, _, _ = await get("/nope")
        assert b"404" in head.split(b"\r\n")[0]
        srv.close()
        await srv.wait_closed()

    asyncio.run(main())


def test_hot_path_series_match_what_prometheus_client_objects_would_export():
    # the per-request series are plain ints handed over at scrape time; the exposition must be the
    # one the Counter/Histogram/Gauge they replace would give: names, types, labels, buckets, values
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from ringblob.metrics import _LATENCY_BUCKETS, _OPS

    ref = CollectorRegistry()
    rq = Counter("ringblob_requests", "Requests answered, by operation and status", ["op", "status"], registry=ref)
    rd = Histogram("ringblob_request_duration_seconds",
                   "Request latency (frame decoded to reply queued) in seconds, by operation", ["op"],
                   buckets=_LATENCY_BUCKETS, registry=ref)
    inf = Gauge("ringblob_requests_in_flight", "Requests being served now", registry=ref)
    rb = Counter("ringblob_received_bytes", "Bytes read from client sockets", registry=ref)
    sb = Counter("ringblob_sent_bytes", "Bytes written to client sockets", registry=ref)
    for op in _OPS:
        rq.labels(op, "ok")
        rd.labels(op)
    m = Metrics()
    events = [("get", 0, 0.00005), ("get", 0, 0.0000501), ("get", errors.NotFound.code, 0.0001),
              ("put", 0, 0.3), ("put", errors.NoSpace.code, 11.0), ("mget", 0, 0.0), ("ping", 0, 2.5),
              ("get", 0, 1e-9), ("op42", 1, 0.002)]
    for op, code, sec in events:
        m.observe_request(op, code, sec)
        rq.labels(op, status_label(code)).inc()
        rd.labels(op).observe(sec)
    m.requests_in_flight += 3
    m.requests_in_flight -= 1
    inf.inc(3)
    inf.dec()
    m.bytes_received += 12345
    rb.inc(12345)
    m.bytes_sent += 678
    sb.inc(678)

    def fams(text):
        out = {}
        for fam in text_string_to_metric_families(text):
            out[fam.name] = (fam.type, fam.documentation,
                             {(s.name, tuple(sorted(s.labels.items()))): (None if s.name.endswith("_created") else s.value)
                              for s in fam.samples})
        return out

    from prometheus_client.exposition import generate_latest

    want = fams(generate_latest(ref).decode())
    got = fams(m.render().decode())
    for name, fam in want.items():
        assert got[name] == fam, name
    assert m.request_count("get") == 3 and m.request_count("get", "not_found") == 1
    assert m.request_count("put", "no_space") == 1 and m.request_count("has") == 0


def test_group_commit_histograms_match_what_prometheus_client_objects_would_export():
    # observed once per commit round in plain lists, handed over at scrape time: the exposition
    # must be the one the Histogram objects they replace would give (names, types, buckets, values)
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.exposition import generate_latest

    from ringblob.metrics import _BATCH_BUCKETS, _LATENCY_BUCKETS

    ref = CollectorRegistry()
    fd = Histogram("ringblob_fdatasync_duration_seconds", "fdatasync latency in seconds",
                   buckets=_LATENCY_BUCKETS, registry=ref)
    gc = Histogram("ringblob_group_commit_batch_size", "Sync requests made durable by one group commit (one fdatasync)",
                   buckets=_BATCH_BUCKETS, registry=ref)
    m = Metrics()
    for sec in (0.00005, 0.0000501, 0.0001, 0.3, 11.0, 0.0, 1e-9, 0.002):
        m.on_fdatasync(sec)
        fd.observe(sec)
    for n in (1, 2, 3, 4, 16, 17, 1024, 1025, 5000):
        m.on_group_commit(n)
        gc.observe(n)

    def fams(text, names):
        out = {}
        for fam in text_string_to_metric_families(text):
            if fam.name in names:
                out[fam.name] = (fam.type, fam.documentation,
                                 {(s.name, tuple(sorted(s.labels.items()))):
                                  (None if s.name.endswith("_created") else s.value) for s in fam.samples})
        return out

    names = ("ringblob_fdatasync_duration_seconds", "ringblob_group_commit_batch_size")
    want = fams(generate_latest(ref).decode(), names)
    got = fams(m.render().decode(), names)
    assert set(want) == set(names) and got == want
