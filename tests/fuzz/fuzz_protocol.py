"""Coverage-guided fuzzing (atheris / libFuzzer) of the sans-I/O wire codec, in process.

Target: :class:`ringblob.protocol.FrameDecoder` and :func:`ringblob.protocol.parse_request`,
plus the client-side reply decoders. The first input byte picks the decoder's
``max_frame_size`` and how the rest of the input is split into ``feed`` calls;
the rest is the byte stream. Properties checked on every input:

* the only exception is :class:`ringblob.errors.ProtocolError` (or its subclass
  ``FrameTooLarge``); anything else (IndexError, struct.error, MemoryError, ...) is a bug;
* an error is sticky: ``next_frame`` raises it again;
* feeding in pieces gives the same frames and the same error as feeding at once;
* the frames re-encode (``encode_frame``) to exactly the bytes they were decoded from;
* a parsed request re-encodes with the client's ``encode_*`` function to exactly its
  frame (when the client could send it: non-empty keys);
* ``decode_*_reply`` and ``reply_error`` on any frame body raise nothing but ProtocolError.

Run: ``make fuzz`` (installs atheris into .venv when missing; FUZZ_SECONDS=60), or
``.venv/bin/python tests/fuzz/fuzz_protocol.py --seconds 60`` which runs the
fuzzer in a child process and prints the suite's ``FIGURES`` line (inputs = libFuzzer's
executions). The corpus is kept in .test-tmp/fuzz-corpus/; a crashing input is written
to .test-tmp/fuzz-artifacts/crash-* (replay: ``tests/fuzz/fuzz_protocol.py --worker FILE``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(REPO, ".test-tmp", "fuzz-corpus")
ARTIFACTS = os.path.join(REPO, ".test-tmp", "fuzz-artifacts")


def _check(data: bytes) -> None:
    """One input (see the module docstring); raises AssertionError or a non-ProtocolError on a bug."""
    from ringblob import errors
    from ringblob import protocol as P

    if not data:
        return
    ctl, stream = data[0], data[1:]
    max_frame = (P.HEADER_SIZE, 64, 300, 4096, P.DEFAULT_MAX_FRAME_SIZE, 1 << 40)[ctl % 6]

    def run(chunk: int):
        dec = P.FrameDecoder(max_frame)
        frames, err = [], None
        try:
            pos = 0
            while True:
                piece = stream[pos: pos + chunk] if chunk else stream[pos:]
                pos += len(piece)
                dec.feed(piece)
                while (f := dec.next_frame()) is not None:
                    frames.append(f)
                if not piece or pos >= len(stream):
                    break
        except errors.ProtocolError as exc:
            err = exc
            try:
                dec.next_frame()
            except errors.ProtocolError as again:
                assert again is exc, "the decoder's error is not sticky"
            else:
                raise AssertionError("next_frame returned after an error")
        return frames, err, dec

    frames, err, dec = run(0)
    chunk = (ctl >> 3) % 5
    if chunk:
        frames2, err2, _ = run((1, 2, 7, 21)[chunk - 1])
        assert [(f.opcode, f.flags, f.request_id, f.body) for f in frames2] == \
            [(f.opcode, f.flags, f.request_id, f.body) for f in frames], "split feeding changed the frames"
        assert type(err2) is type(err), (err, err2)
        if err is not None:
            assert (err.request_id, err.opcode) == (err2.request_id, err2.opcode)
    encoded = b"".join(P.encode_frame(f.opcode, f.request_id, f.body, f.flags) for f in frames)
    assert stream.startswith(encoded), "frames do not re-encode to their bytes"
    if err is None:
        assert dec.buffered == len(stream) - len(encoded)
    for f in frames:
        raw = P.encode_frame(f.opcode, f.request_id, f.body, f.flags)
        try:
            req = P.parse_request(f)
        except errors.ProtocolError as exc:
            assert (exc.request_id, exc.opcode) == (f.request_id, f.opcode)
            req = None
        if req is not None:
            _reencode(P, req, raw)
        for fn in (P.decode_bool_reply, P.decode_list_reply, P.decode_mget_reply, P.decode_stat_reply):
            try:
                fn(f.body)
            except errors.ProtocolError:
                pass
        e = P.reply_error(f)
        assert (e is None) == (f.flags == 0)
        assert e is None or isinstance(e, errors.RingblobError)


def _reencode(P, req, raw: bytes) -> None:
    op, rid = req.op, req.request_id
    if op is P.Op.PUT:
        if req.key:
            assert P.encode_put(rid, req.key, req.value, sync=req.sync, verify=req.verify) == raw
    elif op in (P.Op.GET, P.Op.HAS):
        if req.key:
            assert (P.encode_get if op is P.Op.GET else P.encode_has)(rid, req.key) == raw
    elif op is P.Op.DELETE:
        if req.key:
            assert P.encode_delete(rid, req.key, sync=req.sync) == raw
    elif op is P.Op.LIST:
        assert P.encode_list(rid, req.prefix, req.start_after, req.limit) == raw
    elif op is P.Op.PING:
        assert P.encode_ping(rid, req.value) == raw
    elif op is P.Op.MPUT:
        if all(k for k, _ in req.items):
            assert P.encode_mput(rid, req.items, sync=req.sync) == raw
    elif op is P.Op.MGET:
        if all(req.keys):
            assert P.encode_mget(rid, req.keys) == raw
    else:
        enc = {P.Op.FLUSH: P.encode_flush, P.Op.STAT: P.encode_stat, P.Op.NEEDS_FLUSH: P.encode_needs_flush}[op]
        assert enc(rid) == raw


def _seed_corpus() -> None:
    """A few valid frames of every opcode, so the fuzzer starts past the magic."""
    from ringblob import protocol as P

    os.makedirs(CORPUS, exist_ok=True)
    seeds = [
        P.encode_put(1, b"key", b"value", sync=True), P.encode_put(2, b"k" * 32, b"", verify=True),
        P.encode_get(3, b"k"), P.encode_has(4, b"h"), P.encode_delete(5, b"d", sync=True),
        P.encode_list(6, b"p", b"pa", 10), P.encode_flush(7), P.encode_stat(8), P.encode_ping(9, b"ping"),
        P.encode_mput(10, [(b"a", b"1"), (b"b", b"22")], sync=True), P.encode_mget(11, [b"a", b"b", b"c"]),
        P.encode_needs_flush(12),
        P.encode_get(13, b"a") + P.encode_ping(14, b"x"),
    ]
    for i, s in enumerate(seeds):
        for ctl in (3, 4 | 8):
            path = os.path.join(CORPUS, f"seed-{i:02d}-{ctl}")
            if not os.path.exists(path):
                with open(path, "wb") as fh:
                    fh.write(bytes([ctl]) + s)


def worker(argv: list[str]) -> None:
    """Run libFuzzer in this process (never returns): ``argv`` are libFuzzer's arguments."""
    import atheris

    with atheris.instrument_imports(include=["ringblob"]):
        from ringblob import protocol  # noqa: F401  (instrumented for coverage)
        from ringblob import errors  # noqa: F401

    atheris.Setup([sys.argv[0], *argv], _check)
    atheris.Fuzz()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="atheris fuzzing of ringblob's wire codec (FrameDecoder, parse_request)")
    ap.add_argument("--seconds", type=int, default=60, help="fuzzing time (libFuzzer -max_total_time), default 60")
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help="run libFuzzer in this process with these arguments")
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("fuzz_protocol: atheris is not installed; `make fuzz` installs it (pip install atheris)", file=sys.stderr)
        return 2
    _seed_corpus()
    os.makedirs(ARTIFACTS, exist_ok=True)
    t0 = time.monotonic()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"-max_total_time={args.seconds}",
           f"-artifact_prefix={ARTIFACTS}/", "-print_final_stats=1", "-max_len=4096", CORPUS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, text=True,
                            errors="replace")
    runs = 0
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line])[-60:]
        if line.startswith("#") or "DONE" in line or "stat::" in line:
            m = re.match(r"#(\d+)", line) or re.search(r"stat::number_of_executed_units:\s*(\d+)", line)
            if m:
                runs = max(runs, int(m.group(1)))
        m = re.search(r"Done (\d+) runs", line)
        if m:
            runs = max(runs, int(m.group(1)))
    rc = proc.wait()
    crashed = rc != 0
    if crashed:
        sys.stdout.write("".join(tail))
    figures = {
        "suite": "codec fuzzing (atheris)",
        "count": runs,
        "unit": "fuzz inputs (libFuzzer executions)",
        "acknowledged_lost": 0,
        "wrong_bytes": 0,
        "crashes": 1 if crashed else 0,
        "seconds": round(time.monotonic() - t0, 1),
        "corpus_files": len(os.listdir(CORPUS)),
    }
    print("FIGURES " + json.dumps(figures))
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
