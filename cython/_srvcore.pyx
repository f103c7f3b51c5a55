# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""ringblob._srvcore — the server's per-request path in C (:mod:`ringblob.server`).

Two base classes hold the state the request path touches as typed fields:
:class:`ServerCore` (of ``Server``: requests in flight, ``stopping``, the
requests served without a Task, the waiting connections, the metrics, the
store's ``get_nowait`` / ``put_nowait``) and :class:`ConnCore` (of
``_Connection``: its in-flight count, reply-byte reservation, the replies of
this loop turn, the flow-control flags). Python code reads and writes them as
ordinary attributes. In C:

* :meth:`ConnCore.buffer_updated` — a socket read into the server's scratch
  buffer: while the connection's ``FrameDecoder`` holds nothing, complete small
  GET and PUT frames are taken straight out of the read (one copy: the key,
  the PUT's value) and started with the store's ``get_nowait`` /
  ``put_nowait``, and HAS and PING frames answered at once as
  ``_Connection._serve_inline`` answers them (the store's ``has``; the PING's
  body echoed), under the very checks ``_Connection._dispatch`` makes before
  each frame (closing, unsent replies, write high water, the in-flight limits).
  At the first frame it does not take (another opcode, unusual flags, a
  malformed or partial or large frame, a limit reached, a GET the store
  declines, shutdown) the rest of the read is fed to the decoder and the
  Python ``_pump`` goes on from there, so statuses, errors, flow control and
  the ``max_receive_bytes`` accounting are those of the decoder path. A read
  into a large PUT's value sink (the store's ``LeasedValue``, about ten reads
  per MiB over a Unix socket) does the decoder's ``recv_target`` /
  ``received_in_place`` and the connection's ``max_receive_bytes`` accounting
  (while under the cap with no one waiting) in C; the read that completes the
  value starts the PUT with the store's ``put_leased_nowait`` (``_big_put_c``:
  what ``_pump`` → ``_dispatch`` → ``_start`` do, when nothing else is
  buffered, no limit holds and the key is well formed), and the read that
  brings a large frame's head skips ``_pump``, which would find no frame
  (``_pump_idle_c``);
* :class:`Done` — the completion of such a GET or PUT (one small C object);
* :meth:`ConnCore._finish_c` / :meth:`ConnCore._queue_reply` /
  :meth:`ConnCore._flush_out` — reply header packing, in-flight counters, the
  reply-byte budget, the request metrics (the ``Metrics`` object's plain-int
  counters and histogram lists, as ``Metrics.observe_request`` counts them)
  and one ``writelines`` per connection per loop turn.

The rare paths (errors, other opcodes, coroutines) stay in ``server.py``.
Compiling the Python with Cython gained nothing; typed fields, C calls and
fewer objects and copies per request did: the daemon's CPU per 4 KiB GET at
32 concurrent went from 14.8 to 10.5 µs and per 4 KiB sync PUT from 30.4 to
23.5 µs on the 2-CPU bench VM (medians of three A/B rounds).
"""

cimport cython
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem, PyDict_DelItem
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.ref cimport PyObject
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from rb_endian cimport rb_le64, rb_le32, rb_put_le64, rb_put_le32, rb_put_le16

from ringblob import metrics as M
from ringblob import protocol as P
from ringblob.errors import FrameTooLarge, TooLarge
from ringblob._storeput import PutPath as _PutPath

cdef int _P_CONN = 1
cdef int _P_TOTAL = 2
cdef int _P_WRITE = 4
cdef int _P_BYTES = 8

cdef Py_ssize_t _HDR = 20
cdef Py_ssize_t _LARGE_BODY = P.LARGE_BODY
cdef int _OP_PUT = 1
cdef int _OP_GET = 2
cdef int _OP_HAS = P.Op.HAS
cdef int _OP_PING = P.Op.PING
cdef int _PUT_FLAGS = P.FLAG_SYNC | P.FLAG_VERIFY
cdef int _NOPS = 256

cdef bytes _TRUE = P.bool_body(True)
cdef bytes _FALSE = P.bool_body(False)
cdef object _Request = P.Request
cdef object _Op = P.Op
cdef dict _OP_BY_CODE = {int(o): o for o in P.Op}
cdef tuple _SUPPRESS = (RuntimeError, AttributeError)


cdef inline double _now() noexcept nogil:
    """``time.perf_counter()`` (CLOCK_MONOTONIC on Linux), in seconds."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


def perf_counter():
    """The clock of the request latencies (``time.perf_counter``'s, CLOCK_MONOTONIC), in seconds."""
    return _now()


@cython.final
@cython.freelist(64)
cdef class Done:
    """The completion of one GET or PUT the store serves with ``get_nowait`` / ``put_nowait``:
    called once with ``(value, error)`` (``value``: the GET's bytes, None for a PUT). It is also
    the request's entry in ``Server._eager`` while it is in flight."""

    cdef ConnCore conn
    cdef int opcode
    cdef int flags
    cdef object request_id
    cdef object key
    cdef object req  # the Request, when one was made (else one is made for an error reply)
    cdef public long long cost
    cdef double t0

    def __call__(self, value, err):
        conn = self.conn
        PyDict_DelItem(conn.server._eager, self)
        if err is None:
            conn._finish_c(self.opcode, self.request_id, [] if value is None else [value], 0, self.t0, self.cost)
        else:
            conn._failed(self._request(), err, self.t0, self.cost)

    cdef object _request(self):
        if self.req is None:
            self.req = _Request(_OP_BY_CODE[self.opcode], self.request_id, self.flags, self.key)
        return self.req


cdef Done _new_done(ConnCore conn, int opcode, int flags, object request_id, object key, object req,
                    long long cost, double t0):
    cdef Done d = Done.__new__(Done)
    d.conn = conn
    d.opcode = opcode
    d.flags = flags
    d.request_id = request_id
    d.key = key
    d.req = req
    d.cost = cost
    d.t0 = t0
    return d


cdef class NetCounters:
    """The base class of :class:`ringblob.metrics.Metrics`: its hot-path counters
    ``requests_in_flight``, ``bytes_received`` and ``bytes_sent`` (ints) as C fields, so that
    the request path updates them with no attribute lookup. Python reads and writes them as
    ordinary attributes."""

    cdef public long long requests_in_flight
    cdef public long long bytes_received
    cdef public long long bytes_sent


cdef class ServerCore:
    """The base class of ``ringblob.server.Server``: the fields its connections' request path
    reads and writes, typed (see the module docstring)."""

    cdef public long long in_flight
    cdef public bint stopping
    cdef public dict _eager
    cdef public set _waiting
    cdef public object _get_nowait
    cdef public object _has_now  # the store's has() when it is a plain function (None: HAS takes _pump)
    cdef object _put_nowait_f
    cdef bint _put_pos  # _put_nowait is a PutPath's: sync and verify go by position
    cdef object _put_leased_f
    cdef bint _leased_pos  # the same for _put_leased_nowait
    cdef public object _scratch
    cdef public object _scratch_head
    cdef object _config
    # the config's flow-control limits, read once when ``config`` is set (ServerConfig is not
    # changed after the server is made; a new one assigned to ``config`` is read again)
    cdef long long _whw
    cdef long long _per_conn
    cdef long long _total
    cdef long long _max_recv  # the config's max_receive_bytes (-1: it has none)
    # max_receive_bytes accounting (``Server._received_changed``): bytes of received frames held by
    # all connections, the connection reading over the cap, the connections waiting for their turn
    cdef public long long _recv_total
    cdef public object _recv_owner
    cdef public object _recv_waiters
    cdef object _metrics
    cdef NetCounters _net  # _metrics when it is a NetCounters (Metrics is), else None
    cdef dict _counts  # Metrics._req_counts: (op name, status) -> requests answered
    cdef dict _durations  # Metrics._durations: op name -> [count per bucket..., sum of seconds]
    cdef double *_bounds
    cdef Py_ssize_t _nbounds
    cdef list _op_names  # opcode -> lower-case name
    cdef list _ok_keys  # opcode -> (name, 0)

    def __cinit__(self, *args, **kwargs):
        self.in_flight = 0
        self._eager = {}
        self._waiting = set()
        self._bounds = NULL
        self._nbounds = 0
        self._op_names = [P.op_name(i) for i in range(_NOPS)]
        self._ok_keys = [(name, 0) for name in self._op_names]

    def __dealloc__(self):
        if self._bounds is not NULL:
            PyMem_Free(self._bounds)
            self._bounds = NULL

    property _put_nowait:
        """The store's ``put_nowait`` (None: PUTs take the coroutine path)."""

        def __get__(self):
            return self._put_nowait_f

        def __set__(self, f):
            self._put_nowait_f = f
            self._put_pos = type(getattr(f, "__self__", None)) is _PutPath

    property _put_leased_nowait:
        """The store's ``put_leased_nowait`` (None: large PUTs received into value sinks take the
        coroutine path)."""

        def __get__(self):
            return self._put_leased_f

        def __set__(self, f):
            self._put_leased_f = f
            self._leased_pos = type(getattr(f, "__self__", None)) is _PutPath

    property config:
        """The ``ServerConfig``; its ``write_high_water``, ``max_in_flight_per_conn``,
        ``max_in_flight_total`` and ``max_receive_bytes`` are cached in C when it is set."""

        def __get__(self):
            return self._config

        def __set__(self, cfg):
            self._config = cfg
            self._whw = getattr(cfg, "write_high_water", 0) or 0
            self._per_conn = getattr(cfg, "max_in_flight_per_conn", 0) or 0
            self._total = getattr(cfg, "max_in_flight_total", 0) or 0
            self._max_recv = getattr(cfg, "max_receive_bytes", -1)

    property metrics:
        """The :class:`~ringblob.metrics.Metrics` requests are counted in."""

        def __get__(self):
            return self._metrics

        def __set__(self, m):
            self._metrics = m
            self._net = <NetCounters>m if isinstance(m, NetCounters) else None
            self._counts = None
            self._durations = None
            counts = getattr(m, "_req_counts", None)
            durations = getattr(m, "_durations", None)
            if type(m) is M.Metrics and type(counts) is dict and type(durations) is dict:
                bounds = M._LATENCY_BOUNDS
                if self._bounds is NULL:
                    self._bounds = <double *>PyMem_Malloc(len(bounds) * sizeof(double))
                    if self._bounds is NULL:
                        raise MemoryError()
                for i, b in enumerate(bounds):
                    self._bounds[i] = b
                self._nbounds = len(bounds)
                self._counts = counts
                self._durations = durations

    cdef inline int _add_in_flight(self, long long d) except -1:
        """``metrics.requests_in_flight += d``."""
        if self._net is not None:
            self._net.requests_in_flight += d
        else:
            self._metrics.requests_in_flight += d
        return 0

    def _observe_request(self, int opcode, int status, double seconds):
        """:meth:`_observe` from Python (tests): count one request of ``opcode``."""
        self._observe(opcode, status, seconds)

    cdef int _observe(self, int opcode, int status, double seconds) except -1:
        """``Metrics.observe_request(name of opcode, status, seconds)``, in C for the common case
        (status 0, an op already counted)."""
        cdef PyObject *p
        cdef PyObject *hp
        cdef Py_ssize_t i, n
        name = self._op_names[opcode & 0xFF]
        if status == 0 and self._counts is not None:
            key = self._ok_keys[opcode & 0xFF]
            p = PyDict_GetItem(self._counts, key)
            hp = PyDict_GetItem(self._durations, name)
            if p is not NULL and hp is not NULL and type(<object>hp) is list:
                h = <list>hp
                n = self._nbounds
                if len(h) == n + 1:
                    PyDict_SetItem(self._counts, key, <object>p + 1)
                    i = 0
                    while i < n and self._bounds[i] < seconds:  # bisect_left
                        i += 1
                    h[i] = h[i] + 1
                    h[n] = h[n] + seconds
                    return 0
        self._metrics.observe_request(name, status, seconds)
        return 0


cdef class ConnCore:
    """The base class of ``ringblob.server._Connection``: its request-path state as typed fields
    and the request path in C (see the module docstring)."""

    cdef public ServerCore server
    cdef object _loop
    cdef object _time  # loop.time
    cdef object _call_soon  # loop.call_soon
    cdef object _flush_cb  # self._flush_out
    cdef public object decoder
    cdef object _transport
    cdef object _writelines  # transport.writelines
    cdef public long long in_flight
    cdef public long long reply_reserved  # bytes of GET/MGET replies dispatched and not yet queued
    cdef public object held
    cdef public long long recv_held
    cdef public list out
    cdef public long long out_bytes  # reply body bytes queued this loop turn
    cdef public long long out_total  # the same with the frame headers
    cdef public bint stalled
    cdef public bint flush_scheduled
    cdef public int paused
    cdef public bint reading_paused
    cdef public bint closing
    cdef public bint eof
    cdef public bint closed
    cdef public bint rejected
    cdef public bint _in_place
    cdef public bint _head_next
    cdef public double last_activity

    def __cinit__(self, *args, **kwargs):
        self.out = []

    property transport:
        """The connection's transport; its ``writelines`` is cached when it is set."""

        def __get__(self):
            return self._transport

        def __set__(self, transport):
            self._transport = transport
            self._writelines = transport.writelines if transport is not None else None

    property loop:
        """The event loop; its ``time`` and ``call_soon`` are cached when it is set."""

        def __get__(self):
            return self._loop

        def __set__(self, loop):
            self._loop = loop
            self._time = loop.time if loop is not None else None
            self._call_soon = loop.call_soon if loop is not None else None
            self._flush_cb = self._flush_out if loop is not None else None

    # -- reading --

    def get_buffer(self, sizehint):
        """asyncio ``BufferedProtocol``: where the next socket read lands — the decoder's
        ``recv_target()`` (a large body received in place), else the server's scratch buffer
        (its first ``SCRATCH_HEAD`` bytes right after a large body completed in place)."""
        dec = self.decoder
        target = None
        # (a decoder with no large frame under way has no target: skip the call)
        if dec._big_len is not None:
            sink = dec._sink
            # a large PUT's value goes into a value sink: its target() is the decoder's recv_target()
            target = sink.target() if sink is not None else dec.recv_target()
        if target is not None:
            self._in_place = True
            return target
        self._in_place = False
        srv = self.server
        if self._head_next:
            # the last read completed a large body received in place; a client sending large
            # values sends the next one now: read only its header and key, so that its value is
            # read in place too instead of being copied out of a full scratch read. It stays set
            # until bytes arrive (buffer_updated): a read that found the socket empty (EAGAIN,
            # which the event loop answers with no buffer_updated) must not turn the next one
            # into a full scratch read that copies 256 KiB of the next value
            return srv._scratch_head
        return srv._scratch

    def buffer_updated(self, Py_ssize_t nbytes):
        """asyncio ``BufferedProtocol``: ``nbytes`` were read into the buffer ``get_buffer``
        handed out."""
        if self.closing:
            return
        cdef ServerCore srv = self.server
        if srv._net is not None:
            srv._net.bytes_received += nbytes
        else:
            srv._metrics.bytes_received += nbytes
        self.last_activity = self._time()
        if self._in_place:
            self._in_place = False
            dec = self.decoder
            sink = dec._sink
            if sink is not None:
                # FrameDecoder.received_in_place of a value piece (the decoder's sink path), then
                # _Connection._account_received, in C
                fill = dec._big_fill
                big = dec._big_len
                if nbytes < 0 or fill + nbytes > big:
                    raise ValueError(f"received_in_place: {nbytes} bytes do not fit the value being received")
                sink.advance(nbytes)
                fill += nbytes
                dec._big_fill = fill
                if fill != big:
                    # FrameDecoder.buffered while a large frame is under way
                    self._account_held(srv, len(dec._buf) - dec._pos + _HDR + fill)
                    return
                self._head_next = True
                if not self._big_put_c(srv, dec, sink):
                    self._pump()
                return
            if not dec.received_in_place(nbytes):
                # the large body goes on: no frame to dispatch yet (the in-flight limits are
                # checked when it is complete)
                self._account_received()
                return
            self._head_next = True
            self._pump()
            return
        self._head_next = False
        self._take_scratch(nbytes)

    cdef int _pump_idle_c(self, ServerCore srv, dec) except -1:
        """``_Connection._pump`` when the decoder holds no complete frame and nothing is held
        (the head of a large frame was just fed): ``_dispatch`` finds nothing to start — it
        unpauses the in-flight limits unless a limit holds, and closes a half-closed idle
        connection —, then the ``max_receive_bytes`` accounting of what the decoder holds."""
        if self.closing or self._limits_ok(srv._whw, srv._per_conn, srv._total):
            self._unpause_c(_P_CONN | _P_TOTAL)
            if self.eof:
                self._maybe_close()
        n = len(dec._buf) - dec._pos  # FrameDecoder.buffered
        if dec._big_len is not None:
            n += _HDR + dec._big_fill
        self._account_held(srv, 0 if self.closed else n)
        return 0

    cdef int _big_put_c(self, ServerCore srv, dec, sink) except -1:
        """A large PUT whose value ``sink`` (a ``LeasedValue``) just completed, started with the
        store's ``put_leased_nowait`` as ``_Connection._pump`` → ``_dispatch`` → ``_start`` do,
        in C: when nothing else is buffered or held, no limit holds it, and the frame is what
        ``parse_request`` accepts without a word (a non-empty key and nothing after it). Returns
        0, having changed nothing, otherwise (``_pump`` takes it, with its statuses and errors);
        1 when it took the frame."""
        put = srv._put_leased_f
        if (put is None or self.held is not None or srv.stopping or self.closing
                or dec._error is not None or len(dec._buf) != dec._pos):
            return 0
        pre = dec._pre_body
        if type(pre) is not bytes:
            return 0
        cdef Py_ssize_t n = len(pre)
        cdef const uint8_t *pp = <const uint8_t *>PyBytes_AS_STRING(pre)
        if n < 2 or pp[0] != n - 1:
            return 0
        opcode, flags_o, rid = dec._big_head
        cdef int flags = flags_o
        if opcode != _OP_PUT or flags & ~_PUT_FLAGS:
            return 0
        if not self._limits_ok(srv._whw, srv._per_conn, srv._total):
            return 0  # (_pump finds the same limit)
        dec._finish_big()  # the frame is taken: the decoder's large-frame state is reset
        key = PyBytes_FromStringAndSize(<const char *>pp + 1, n - 1)
        self.paused &= ~_P_BYTES
        self.in_flight += 1
        srv.in_flight += 1
        srv._add_in_flight(1)
        self._put_now_c(put, srv._leased_pos, key, sink, flags, rid, True)
        # the end of _dispatch (nothing else buffered) and of _pump
        self._unpause_c(_P_CONN | _P_TOTAL)
        if self.eof:
            self._maybe_close()
        self._account_held(srv, 0)
        return 1

    cdef int _account_held(self, ServerCore srv, long long n) except -1:
        """``_Connection._account_received`` with the decoder holding ``n`` bytes: the common case
        (under ``max_receive_bytes``, no connection waiting for a turn) in C, the rest by
        ``Server._received_changed``."""
        cdef long long delta = n - self.recv_held
        if delta == 0:
            return 0
        self.recv_held = n
        if (srv._recv_owner is None and not srv._recv_waiters
                and srv._recv_total + delta <= srv._max_recv):
            srv._recv_total += delta
        else:
            srv._received_changed(self, delta)
        return 0

    def _may_dispatch(self):
        """The flow-control checks before each frame, for ``_Connection._dispatch`` (the C path
        makes the same ones through ``_limits_ok``): True when a frame may be dispatched now;
        else the connection is marked stalled or its reading paused, as the limit says."""
        cdef ServerCore srv = self.server
        return self._limits_ok(srv._whw, srv._per_conn, srv._total) == 1

    cdef int _limits_ok(self, long long cfg_whw, long long per_conn, long long total) except -1:
        """The checks made before each frame, with their effects: 1 when a frame may be
        dispatched now (0: closing, replies over the write high water — stalled —, or an
        in-flight limit reached — reading paused)."""
        srv = self.server
        if self.closing:
            return 0
        if self.paused & _P_WRITE:
            return 0
        if self.out_bytes >= cfg_whw:
            self.stalled = True
            return 0
        if self.in_flight >= per_conn:
            self._pause_c(_P_CONN)
            return 0
        if srv.in_flight >= total:
            self._pause_c(_P_TOTAL)
            srv._waiting.add(self)
            return 0
        self.paused &= ~(_P_CONN | _P_TOTAL)
        return 1

    cdef _take_scratch(self, Py_ssize_t nbytes):
        cdef ServerCore srv = self.server
        cdef Py_buffer view
        cdef const uint8_t *p
        cdef const uint8_t *body
        cdef Py_ssize_t pos = 0, length, k
        cdef int opcode, flags, ok = 1
        cdef uint64_t rid
        dec = self.decoder
        if (self.held is not None or srv.stopping or dec._big_len is not None or dec._error is not None
                or len(dec._buf) != dec._pos):
            with srv._scratch[:nbytes] as chunk:
                dec.feed(chunk)  # copies: the scratch buffer is reused by the next read
            self._pump()
            return
        cdef long long whw = srv._whw
        cdef long long per_conn = srv._per_conn
        cdef long long total = srv._total
        cdef Py_ssize_t max_frame = dec.max_frame_size
        get_nowait = srv._get_nowait
        put_nowait = srv._put_nowait_f
        has_now = srv._has_now
        cdef double t0
        PyObject_GetBuffer(srv._scratch, &view, PyBUF_SIMPLE)
        try:
            p = <const uint8_t *>view.buf
            if nbytes > view.len:
                nbytes = view.len
            while True:
                ok = self._limits_ok(whw, per_conn, total)
                if not ok:
                    break
                if nbytes - pos < _HDR or srv.stopping or self.held is not None:
                    break
                if memcmp(p + pos, b"RBLB", 4) != 0 or p[pos + 4] != 1:
                    break
                length = rb_le32(p + pos + 16)
                if length >= _LARGE_BODY or _HDR + length > max_frame or nbytes - pos - _HDR < length:
                    break
                opcode = p[pos + 5]
                flags = p[pos + 6] | (p[pos + 7] << 8)
                rid = rb_le64(p + pos + 8)
                body = p + pos + _HDR
                if opcode == _OP_GET:
                    if flags or length < 2 or body[0] != length - 1 or get_nowait is None:
                        break
                    key = PyBytes_FromStringAndSize(<const char *>body + 1, length - 1)
                    if not self._get_now_c(get_nowait, key, rid, None):
                        break  # the store declines: the decoder path takes this GET from the start
                    self.paused &= ~_P_BYTES
                elif opcode == _OP_PUT:
                    if flags & ~_PUT_FLAGS or length < 1 or length <= body[0] or put_nowait is None:
                        break
                    k = 1 + body[0]
                    key = PyBytes_FromStringAndSize(<const char *>body + 1, k - 1)
                    value = PyBytes_FromStringAndSize(<const char *>body + k, length - k)
                    self.paused &= ~_P_BYTES
                    self.in_flight += 1
                    srv.in_flight += 1
                    srv._add_in_flight(1)
                    self._put_now_c(put_nowait, srv._put_pos, key, value, flags, rid, False)
                elif opcode == _OP_HAS or opcode == _OP_PING:
                    # answered now, as _Connection._serve_inline answers them (no I/O, no in-flight
                    # slot): HAS of a well-formed key, PING echoing its body
                    t0 = _now()
                    if opcode == _OP_HAS:
                        if flags or length < 2 or body[0] != length - 1 or has_now is None:
                            break
                        key = PyBytes_FromStringAndSize(<const char *>body + 1, length - 1)
                        try:
                            found = has_now(key)
                        except Exception:
                            break  # the decoder path asks again and answers with the error
                        reply = _TRUE if found else _FALSE
                    else:
                        if flags:
                            break
                        reply = PyBytes_FromStringAndSize(<const char *>body, length)
                    self.paused &= ~_P_BYTES
                    self._queue_reply_c(opcode, rid, [reply], 0)
                    srv._observe(opcode, 0, _now() - t0)
                else:
                    break
                pos += _HDR + length
        finally:
            PyBuffer_Release(&view)
        if pos < nbytes:
            with srv._scratch[pos:nbytes] as chunk:
                dec.feed(chunk)
            if (dec._big_len is not None and dec._big_fill < dec._big_len and dec._error is None
                    and len(dec._buf) == dec._pos and self.held is None):
                # the head of a large frame (its body follows): no frame to dispatch
                self._pump_idle_c(srv, dec)
            else:
                self._pump()
        elif not ok:
            self._pump()
        else:  # all taken and under the limits: the end of _Connection._dispatch (nothing buffered)
            self._unpause_c(_P_CONN | _P_TOTAL)
            if self.eof:
                self._maybe_close()

    # -- serving --

    cdef int _get_now_c(self, get_nowait, key, request_id, req) except -1:
        cdef ServerCore srv = self.server
        cdef double t0 = _now()
        room = (srv._whw - self.reply_reserved - _HDR) if self.reply_reserved else None
        cdef Done done = _new_done(self, _OP_GET, 0, request_id, key, req, 0, t0)
        self.in_flight += 1
        srv.in_flight += 1
        srv._add_in_flight(1)
        try:
            n = get_nowait(key, done, room)
        except Exception as err:
            self._failed(done._request(), err, t0, 0)
            return 1
        if not n:
            self.in_flight -= 1
            srv.in_flight -= 1
            srv._add_in_flight(-1)
            return 0
        done.cost = n + _HDR
        self.reply_reserved += done.cost
        PyDict_SetItem(srv._eager, done, None)  # in flight (shutdown waits for it); done() removes it
        return 1

    def _get_now(self, req, get_nowait):
        """Serve a GET with the store's ``get_nowait``: the read is queued now and a :class:`Done`
        answers it (no coroutine, no future, one index lookup). The value's length comes back from
        the store, so the reply-byte budget needs no lookup of its own: the store declines a value
        that would pass it. Returns False, having changed nothing, when the store declines (the
        general path takes the GET)."""
        return bool(self._get_now_c(get_nowait, req.key, req.request_id, req))

    cdef _put_now_c(self, put_nowait, bint by_position, key, value, int flags, request_id, bint leased):
        """``_Connection._start`` of a PUT taken in C (counted in flight): the store's
        ``put_nowait`` (``value``: bytes, from the scratch read) or ``put_leased_nowait``
        (``leased``: ``value`` is the ``LeasedValue`` the value was received into), ``sync`` and
        ``verify`` by position when ``by_position``; a store that declines hands the PUT to the
        handler's coroutine with a ``Request`` as the decoder path makes it."""
        cdef ServerCore srv = self.server
        cdef double t0 = _now()
        cdef Done done = _new_done(self, _OP_PUT, flags, request_id, key, None, 0, t0)
        try:
            if by_position:
                queued = put_nowait(key, value, done, bool(flags & 1), bool(flags & 2))
            else:
                queued = put_nowait(key, value, done, sync=bool(flags & 1), verify=bool(flags & 2))
        except Exception as err:
            self._failed(done._request(), err, t0, 0)
            return
        if queued:
            PyDict_SetItem(srv._eager, done, None)
            return
        if leased:
            req = _Request(_OP_BY_CODE[_OP_PUT], request_id, flags, key, b"", sink=value)
        else:
            req = _Request(_OP_BY_CODE[_OP_PUT], request_id, flags, key, value)
        self._start_coro(req, 0, t0)

    def _new_done(self, req, long long cost, double t0):
        """A :class:`Done` answering ``req`` (a PUT or GET ``Request``)."""
        return _new_done(self, req.op, req.flags, req.request_id, req.key, req, cost, t0)

    def _finish(self, req, parts, int status, double t0, long long cost=0):
        """Queue ``req``'s reply (``parts``: its body as buffers), count it and free its slot."""
        self._finish_c(req.op, req.request_id, parts, status, t0, cost)

    cdef _finish_c(self, int opcode, request_id, parts, int status, double t0, long long cost):
        cdef ServerCore srv = self.server
        try:
            self._queue_reply_c(opcode, request_id, parts, status)
        except FrameTooLarge as exc:  # a reply body over the u32 body_length (an MGET of huge values)
            status = TooLarge.code
            name = _OP_BY_CODE[opcode].name if opcode in _OP_BY_CODE else f"op{opcode}"
            message = (f"the {name} reply cannot be sent: {exc}; ask for fewer keys per request "
                       "(or GET the large values one by one)")
            self._queue_reply_c(opcode, request_id, [message.encode()], status)
        srv._observe(opcode, status, _now() - t0)
        self.in_flight -= 1
        self.reply_reserved -= cost
        srv.in_flight -= 1
        srv._add_in_flight(-1)
        if srv._waiting and srv.in_flight < srv._total:
            srv._wake_waiting()
        if self.paused & (_P_CONN | _P_BYTES) and not self.closed:
            self._pump()
        if self.closing or self.eof:
            self._maybe_close()

    # -- writing --

    def _queue_reply(self, int opcode, request_id, parts, int status):
        """Queue a reply frame (header + ``parts``, no copy of the parts) for this turn's writelines.

        Raises :class:`FrameTooLarge` when the body is over the u32 body_length."""
        self._queue_reply_c(opcode, request_id, parts, status)

    cdef int _queue_reply_c(self, int opcode, request_id, parts, int status) except -1:
        """Queue a reply frame (header + ``parts``, no copy of the parts) for this turn's writelines.

        Raises :class:`FrameTooLarge` when the body is over the u32 body_length."""
        cdef Py_ssize_t n = 0
        cdef uint8_t *h
        cdef uint64_t rid = request_id
        if self.closed:
            return 0
        for b in parts:
            n += len(b)
        if n > 0xFFFFFFFF:
            raise FrameTooLarge(f"frame body of {n} bytes cannot be encoded (the limit is 4 GiB - 1)")
        header = PyBytes_FromStringAndSize(NULL, _HDR)
        h = <uint8_t *>PyBytes_AS_STRING(header)
        memcpy(h, b"RBLB", 4)
        h[4] = 1
        h[5] = <uint8_t>opcode
        rb_put_le16(h + 6, <uint16_t>status)
        rb_put_le64(h + 8, rid)
        rb_put_le32(h + 16, <uint32_t>n)
        out = self.out
        out.append(header)
        out.extend(parts)
        self.out_bytes += n
        self.out_total += n + _HDR
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self._call_soon(self._flush_cb)
        return 0

    def _flush_out(self):
        """Write every reply queued during this loop turn with one writelines."""
        self.flush_scheduled = False
        if self.closed or self._transport is None:
            self.out.clear()
            self.out_bytes = self.out_total = 0
            return
        out = self.out
        self.out = []
        n = self.out_total
        self.out_bytes = self.out_total = 0
        if out:
            self._writelines(out)
            srv = self.server
            if srv._net is not None:
                srv._net.bytes_sent += n
            else:
                srv._metrics.bytes_sent += n
            self.last_activity = self._time()
        if self.stalled:
            self.stalled = False
            self._pump()
        if self.closing or self.eof:
            self._maybe_close()

    # -- flow control --

    def _pause(self, int why):
        self._pause_c(why)

    def _pause_reading_now(self):
        self._pause_reading_now_c()

    def _unpause(self, int why):
        self._unpause_c(why)

    # (cdef, not cpdef: a cpdef method called from C on an instance of a Python subclass looks
    # its name up on the instance at every call to see whether it is overridden)
    cdef int _pause_c(self, int why) except -1:
        self.paused |= why
        self._pause_reading_now_c()
        return 0

    cdef int _pause_reading_now_c(self) except -1:
        if not self.reading_paused and not self.closed and self.transport is not None:
            self.reading_paused = True
            try:
                self.transport.pause_reading()
            except _SUPPRESS:
                pass
        return 0

    cdef int _unpause_c(self, int why) except -1:
        self.paused &= ~why
        if self.closed or self.closing:
            return 0
        if why & _P_WRITE:
            self._pump()  # frames may wait in the decoder; _pump resumes reading when all are out
            return 0
        if not self.paused and self.reading_paused:
            self.reading_paused = False
            try:
                self.transport.resume_reading()
            except _SUPPRESS:
                pass
        return 0
