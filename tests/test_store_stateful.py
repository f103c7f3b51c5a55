"""Hypothesis stateful test: BlobStore against a dict model.

Rules: put (sizes from empty to several fixed buffers, sync or not), get,
delete, put_many, flush, checkpoint, close + reopen, crash (abandon) + reopen,
reopen with the other ``sync_method`` (RWF_DSYNC rounds or fdatasync ones).
Without a power cut every acknowledged write is in the file, so after any
reopen the store must equal the model exactly; ``list`` must give the model's
keys in order, and ``needs_flush`` must be False right after a flush.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ringblob.errors import NoSpace, NotFound
from ringblob.store import BlobStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_ROOT = os.path.join(REPO, ".test-tmp")

KEYS = st.sampled_from([b"a", b"b", b"c", b"dd", b"e" * 255, b"\x00", b"\xff\x00"])
SIZES = st.one_of(st.integers(0, 100), st.integers(4000, 9000), st.sampled_from([4096, 262144, 300001]))


def _engine() -> str:
    try:
        from ringblob._uring import Ring  # noqa: F401

        return "auto"
    except ImportError:
        return "psync"


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        os.makedirs(TMP_ROOT, exist_ok=True)
        self.dir = os.path.join(TMP_ROOT, f"stateful-{uuid.uuid4().hex[:10]}")
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "d")
        self.loop = asyncio.new_event_loop()
        self.model: dict[bytes, bytes] = {}
        self.counter = 0
        self.method = "dsync"  # the sync_method of the next open (a rule switches it)
        self.store = self.run(BlobStore.create(self.path, 6 << 20, journal_size=256 << 10, engine=_engine(),
                                               checkpoint_threshold=24 << 10, sync_method=self.method))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def value(self, size: int) -> bytes:
        self.counter += 1
        return (b"%08d" % self.counter) * (size // 8) + b"x" * (size % 8)

    @rule(key=KEYS, size=SIZES, sync=st.booleans())
    def put(self, key, size, sync):
        v = self.value(size)
        try:
            self.run(self.store.put(key, v, sync=sync))
        except NoSpace:
            return
        self.model[key] = v

    @rule(items=st.lists(st.tuples(KEYS, st.integers(0, 5000)), max_size=6), sync=st.booleans())
    def put_many(self, items, sync):
        batch = [(k, self.value(n)) for k, n in items]
        try:
            self.run(self.store.put_many(batch, sync=sync))
        except NoSpace:
            return
        for k, v in batch:
            self.model[k] = v

    @rule(key=KEYS)
    def get(self, key):
        if key in self.model:
            assert self.run(self.store.get(key)) == self.model[key]
        else:
            try:
                self.run(self.store.get(key))
            except NotFound:
                pass
            else:
                raise AssertionError(f"{key!r} should be absent")

    @rule(key=KEYS, sync=st.booleans())
    def delete(self, key, sync):
        self.run(self.store.delete(key, sync=sync))
        self.model.pop(key, None)

    @rule()
    def flush(self):
        self.run(self.store.flush())
        assert not self.store.needs_flush

    @rule()
    def checkpoint(self):
        self.run(self.store.checkpoint())

    def reopen(self):
        self.store = self.run(BlobStore.open(self.path, engine=_engine(), checkpoint_threshold=24 << 10,
                                             sync_method=self.method))
        assert self.store.sync_method == self.method

    @rule()
    def close_reopen(self):
        self.run(self.store.close())
        self.reopen()

    @rule()
    def crash_reopen(self):
        self.run(self.store.abandon())
        self.reopen()

    @rule(method=st.sampled_from(["dsync", "fdatasync"]))
    def reopen_with_sync_method(self, method):
        self.run(self.store.close())
        self.method = method
        self.reopen()

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def scrub_clean(self):
        assert self.run(self.store.scrub())["bad_keys"] == []

    @invariant()
    def listing_matches(self):
        async def keys():
            return [k async for k in self.store.list()]

        assert self.run(keys()) == sorted(self.model)
        assert self.store.stat()["blob_count"] == len(self.model)

    def teardown(self):
        try:
            self.run(self.store.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)


StoreMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("RINGBLOB_STATEFUL_EXAMPLES", "25")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_store_matches_dict_model = StoreMachine.TestCase
