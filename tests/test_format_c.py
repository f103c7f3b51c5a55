"""The journal encoders in C (ringblob._format) against a reference written with ``struct``.

The reference is the pure-Python encoder the C one replaced (the layout of
docs/FORMAT.md); outputs must be identical byte for byte, checksums those of the
``crc32c`` package, and the store's decoders must read them back.
"""

from __future__ import annotations

import struct

import crc32c as crc32c_pkg
import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from ringblob import _format
from ringblob.store import format as F

_RH = struct.Struct("<IHBBQ")
_PUT_TAIL = struct.Struct("<QI32s")
_BH = struct.Struct("<4sIQQIIIIQII")


def ref_record(rtype, seq, body):
    length = _RH.size + len(body)
    rest = _RH.pack(0, length, rtype, 0, seq)[4:] + body
    return struct.pack("<I", crc32c_pkg.crc32c(rest)) + rest


def ref_put(seq, key, page, length, digest):
    return ref_record(1, seq, bytes((len(key),)) + key + _PUT_TAIL.pack(page, length, digest))


def ref_delete(seq, key):
    return ref_record(2, seq, bytes((len(key),)) + key)


def ref_checkpoint(seq, number, cseq):
    return ref_record(3, seq, struct.pack("<QQ", number, cseq))


def ref_batch(store_id, first_seq, records, durable_seq, prev_crc, block):
    payload = b"".join(records)
    total = _BH.size + len(payload)
    nblocks = -(-total // block)
    hdr0 = _BH.pack(b"RBJ1", 0, store_id, first_seq, len(records), len(payload), nblocks,
                    crc32c_pkg.crc32c(payload), durable_seq, prev_crc, 0)
    hcrc = crc32c_pkg.crc32c(hdr0)
    out = hdr0[:4] + struct.pack("<I", hcrc) + hdr0[8:] + payload
    return out + bytes(nblocks * block - len(out)), hcrc


U64 = st.integers(0, (1 << 64) - 1)
U32 = st.integers(0, (1 << 32) - 1)
KEY = st.binary(min_size=1, max_size=255)
REC = st.one_of(
    st.tuples(st.just("put"), U64, KEY, U64, U32, st.binary(min_size=32, max_size=32)),
    st.tuples(st.just("delete"), U64, KEY),
    st.tuples(st.just("checkpoint"), U64, U64, U64),
)


def _encode(rec, c: bool):
    kind, *args = rec
    if c:
        return getattr(F, f"encode_{kind}")(*args)
    return {"put": ref_put, "delete": ref_delete, "checkpoint": ref_checkpoint}[kind](*args)


def test_format_module_uses_the_compiled_encoders():
    assert F.encode_put is _format.encode_put and F.encode_batch is _format.encode_batch
    assert F.encode_delete is _format.encode_delete and F.encode_checkpoint is _format.encode_checkpoint
    assert not hasattr(F, "_record")  # one implementation


@settings(max_examples=300, deadline=None)
@given(recs=st.lists(REC, max_size=40), store_id=U64, first_seq=U64, durable=U64, prev=U32,
       block=st.sampled_from([512, 4096, 1, 7, 65536]))
def test_records_and_batches_match_the_reference_byte_for_byte(recs, store_id, first_seq, durable, prev, block):
    mine = [_encode(r, True) for r in recs]
    assert mine == [_encode(r, False) for r in recs]
    assert F.encode_batch(store_id, first_seq, mine, durable, prev, block) == \
        ref_batch(store_id, first_seq, mine, durable, prev, block)


def test_encoded_batch_decodes():
    d = bytes(range(32))
    recs = [F.encode_put(5, b"key", 99, 1234, d), F.encode_delete(6, b"k" * 255), F.encode_checkpoint(7, 2, 4)]
    batch, hcrc = F.encode_batch(7, 5, recs, 4, 0xABC, 4096)
    assert len(batch) == 4096
    h = F.decode_batch_header(batch)
    assert h.hdr_crc == hcrc and (h.nrec, h.first_seq, h.durable_seq, h.prev_crc) == (3, 5, 4, 0xABC)
    payload = batch[F.BATCH_HEADER_SIZE: F.BATCH_HEADER_SIZE + h.payload_len]
    assert crc32c_pkg.crc32c(payload) == h.payload_crc
    out, problem = F.decode_records(payload, 5, 3)
    assert problem is None
    assert out == [(1, 5, b"key", 99, 1234, d), (2, 6, b"k" * 255, 0, 0, b""), (3, 7, None, 2, 4, b"")]


def test_encoders_reject_bad_input():
    with pytest.raises(ValueError, match="255"):
        F.encode_put(1, b"k" * 256, 0, 0, b"d" * 32)
    with pytest.raises(ValueError, match="255"):
        F.encode_delete(1, b"k" * 256)
    with pytest.raises(OverflowError):
        F.encode_put(1, b"k", 1 << 64, 0, b"d" * 32)
    with pytest.raises(OverflowError):
        F.encode_put(1, b"k", 0, 1 << 32, b"d" * 32)
    with pytest.raises(TypeError):
        F.encode_batch(1, 1, [b"ok", "str"], 0, 0, 4096)
    with pytest.raises(ValueError):
        F.encode_batch(1, 1, [], 0, 0, 0)
    # a short digest is zero padded, a long one cut (struct's 32s)
    assert F.encode_put(1, b"k", 2, 3, b"ab") == ref_put(1, b"k", 2, 3, b"ab")
    assert F.encode_put(1, b"k", 2, 3, b"x" * 40) == ref_put(1, b"k", 2, 3, b"x" * 40)
    assert F.encode_batch(1, 2, [], 3, 4, 4096) == ref_batch(1, 2, [], 3, 4, 4096)
