"""On-disk structures of the blob store: superblocks, journal batches, records, checkpoint chunks.

Pure encoding and decoding (no I/O). The layout is documented in docs/FORMAT.md;
every multi-byte integer is little-endian and every checksum is CRC32C
(Castagnoli) from the ``crc32c`` package. The journal's hot encoders
(:func:`encode_put`, :func:`encode_delete`, :func:`encode_checkpoint`,
:func:`encode_batch`) are C, from ``ringblob._format`` (``cython/_format.pyx``,
same bytes, the same ``crc32c`` package for their checksums).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import crc32c as _crc32c

try:
    from .._format import encode_batch, encode_checkpoint, encode_delete, encode_put
except ImportError as exc:  # pragma: no cover - a source checkout without the build step
    raise ImportError(
        f"ringblob's compiled journal encoders (ringblob._format) do not import ({exc}); build the extensions "
        "with `make setup` or `python setup.py build_ext --inplace` from the source tree"
    ) from exc

__all__ = [
    "crc32c",
    "Superblock",
    "SB_MAGIC",
    "FORMAT_VERSION",
    "REC_PUT",
    "REC_DELETE",
    "REC_CHECKPOINT",
    "BatchHeader",
    "encode_batch",
    "decode_batch_header",
    "decode_records",
    "encode_put",
    "encode_delete",
    "encode_checkpoint",
    "CKPT_MAGIC",
    "ChunkHeader",
    "encode_chunk",
    "decode_chunk_header",
    "ENTRY",
]


def crc32c(data, value: int = 0) -> int:
    """CRC32C (Castagnoli) of ``data`` (bytes-like), continuing from ``value``."""
    return _crc32c.crc32c(data, value)


FORMAT_VERSION = 1
SB_MAGIC = b"RINGBLB1"

# -- superblock ---------------------------------------------------------------
# magic 8s, version I, flags I, store_id Q, generation Q,
# page_size I, batch_max I, total_pages Q, journal_page Q, journal_pages Q, data_page Q,
# ckpt_seq Q, ckpt_page Q, ckpt_npages Q, ckpt_blobs Q, checkpoints Q,
# replay_pos Q, next_seq Q, chain_crc I, reserved I, created_ns Q, crc I
_SB = struct.Struct("<8sIIQQIIQQQQQQQQQQQIIQ")
_SB_CRC = struct.Struct("<I")
SB_SIZE = _SB.size + _SB_CRC.size


@dataclass
class Superblock:
    """One superblock slot. Sizes in pages of ``page_size`` bytes; positions in bytes.

    ``generation`` picks the newer of the two slots (slot = generation % 2).
    ``ckpt_*`` locate the newest checkpoint (``ckpt_page`` 0 = none), whose
    snapshot holds every record up to ``ckpt_seq``. ``replay_pos`` is the
    logical journal position (bytes, monotonic; physical = pos % journal bytes)
    where replay starts, expecting sequence ``next_seq`` and a first batch
    whose ``prev_crc`` is ``chain_crc``.
    """

    store_id: int
    generation: int
    page_size: int
    batch_max: int
    total_pages: int
    journal_page: int
    journal_pages: int
    data_page: int
    ckpt_seq: int = 0
    ckpt_page: int = 0
    ckpt_npages: int = 0
    ckpt_blobs: int = 0
    checkpoints: int = 0
    replay_pos: int = 0
    next_seq: int = 1
    chain_crc: int = 0
    created_ns: int = 0
    version: int = FORMAT_VERSION
    flags: int = 0

    def encode(self, page_size: int) -> bytes:
        """Encode into one page of ``page_size`` bytes (zero padded, CRC32C last)."""
        body = _SB.pack(
            SB_MAGIC, self.version, self.flags, self.store_id, self.generation,
            self.page_size, self.batch_max, self.total_pages, self.journal_page,
            self.journal_pages, self.data_page, self.ckpt_seq, self.ckpt_page,
            self.ckpt_npages, self.ckpt_blobs, self.checkpoints, self.replay_pos,
            self.next_seq, self.chain_crc, 0, self.created_ns,
        )
        raw = body + _SB_CRC.pack(crc32c(body))
        return raw + bytes(page_size - len(raw))

    @classmethod
    def decode(cls, page) -> "Superblock | None":
        """Decode a slot; ``None`` when the magic or the CRC32C does not match."""
        page = bytes(page[:SB_SIZE])
        if len(page) < SB_SIZE or page[:8] != SB_MAGIC:
            return None
        body = page[: _SB.size]
        (crc,) = _SB_CRC.unpack_from(page, _SB.size)
        if crc32c(body) != crc:
            return None
        f = _SB.unpack(body)
        sb = cls(
            store_id=f[3], generation=f[4], page_size=f[5], batch_max=f[6], total_pages=f[7],
            journal_page=f[8], journal_pages=f[9], data_page=f[10], ckpt_seq=f[11], ckpt_page=f[12],
            ckpt_npages=f[13], ckpt_blobs=f[14], checkpoints=f[15], replay_pos=f[16], next_seq=f[17],
            chain_crc=f[18], created_ns=f[20], version=f[1], flags=f[2],
        )
        if sb.version != FORMAT_VERSION:
            return None
        return sb


# -- journal ------------------------------------------------------------------
# (encode_put / encode_delete / encode_checkpoint / encode_batch: ringblob._format, same layout)
# A batch: a header at the start of a journal block, then its records, padded
# to whole journal blocks (page_size). One batch is written by one write.
#   magic 4s, hdr_crc I, store_id Q, first_seq Q, nrec I, payload_len I,
#   nblocks I, payload_crc I, durable_seq Q, prev_crc I, reserved I
BATCH_MAGIC = b"RBJ1"
_BH = struct.Struct("<4sIQQIIIIQII")
BATCH_HEADER_SIZE = _BH.size

# A record: crc I (over the rest of the record), length H (whole record),
# type B, reserved B, seq Q, then the body.
_RH = struct.Struct("<IHBBQ")
REC_HEADER_SIZE = _RH.size
REC_PUT, REC_DELETE, REC_CHECKPOINT = 1, 2, 3
_PUT_TAIL = struct.Struct("<QI32s")  # page, length, blake3 digest
_CKPT_BODY = struct.Struct("<QQ")  # checkpoint number, checkpoint seq


@dataclass
class BatchHeader:
    """A decoded journal batch header (see :func:`encode_batch`)."""

    store_id: int
    first_seq: int
    nrec: int
    payload_len: int
    nblocks: int
    payload_crc: int
    durable_seq: int
    prev_crc: int
    hdr_crc: int = 0


def decode_batch_header(buf) -> BatchHeader | None:
    """Decode a batch header; ``None`` when the magic or header CRC32C is wrong."""
    raw = bytes(buf[:BATCH_HEADER_SIZE])
    if len(raw) < BATCH_HEADER_SIZE or raw[:4] != BATCH_MAGIC:
        return None
    f = _BH.unpack(raw)
    if crc32c(raw[:4] + b"\0\0\0\0" + raw[8:]) != f[1]:
        return None
    return BatchHeader(store_id=f[2], first_seq=f[3], nrec=f[4], payload_len=f[5], nblocks=f[6],
                       payload_crc=f[7], durable_seq=f[8], prev_crc=f[9], hdr_crc=f[1])


def decode_records(payload, first_seq: int, nrec: int) -> tuple[list[tuple], str | None]:
    """Decode up to ``nrec`` records; stop at the first bad one.

    Returns ``(records, problem)``; each record is ``(type, seq, key, page, length, digest)``
    (``key`` None for checkpoint markers; for them ``page`` is the checkpoint number).
    ``problem`` names why decoding stopped early, else None.
    """
    out = []
    pos = 0
    mv = memoryview(payload)
    expect = first_seq
    for _ in range(nrec):
        if pos + REC_HEADER_SIZE > len(mv):
            return out, f"record {expect} truncated"
        crc, length, rtype, _r, seq = _RH.unpack_from(mv, pos)
        if length < REC_HEADER_SIZE or pos + length > len(mv):
            return out, f"record {expect} has a bad length {length}"
        if crc32c(mv[pos + 4 : pos + length]) != crc:
            return out, f"record {expect} fails its CRC32C"
        if seq != expect:
            return out, f"record sequence {seq} where {expect} was expected"
        body = bytes(mv[pos + REC_HEADER_SIZE : pos + length])
        if rtype in (REC_PUT, REC_DELETE):
            klen = body[0] if body else 0
            key = body[1 : 1 + klen]
            if klen == 0 or len(key) != klen:
                return out, f"record {seq} has a bad key"
            if rtype == REC_PUT:
                if len(body) != 1 + klen + _PUT_TAIL.size:
                    return out, f"record {seq} has a bad PUT body"
                page, length_b, digest = _PUT_TAIL.unpack_from(body, 1 + klen)
                out.append((REC_PUT, seq, key, page, length_b, digest))
            else:
                out.append((REC_DELETE, seq, key, 0, 0, b""))
        elif rtype == REC_CHECKPOINT and len(body) == _CKPT_BODY.size:
            number, cseq = _CKPT_BODY.unpack(body)
            out.append((REC_CHECKPOINT, seq, None, number, cseq, b""))
        else:
            return out, f"record {seq} has an unknown type {rtype}"
        pos += length
        expect += 1
    return out, None


# -- checkpoint chunks ----------------------------------------------------------
# A checkpoint (index snapshot) is a chain of chunks, each an extent of whole
# pages: a header then entries, sorted by key across the chain.
#   magic 8s, crc I (header with crc 0 + payload), chunk_no I, store_id Q, ckpt_seq Q,
#   nentries I, payload_len I, next_page Q, next_npages Q
CKPT_MAGIC = b"RBCKPT01"
_CH = struct.Struct("<8sIIQQIIQQ")
CHUNK_HEADER_SIZE = _CH.size
# entry: klen B, key, page Q, length I, digest 32s
ENTRY = struct.Struct("<QI32s")


@dataclass
class ChunkHeader:
    """A decoded checkpoint chunk header."""

    chunk_no: int
    store_id: int
    ckpt_seq: int
    nentries: int
    payload_len: int
    next_page: int
    next_npages: int
    crc: int = 0
    extra: dict = field(default_factory=dict)


def encode_chunk(chunk_no: int, store_id: int, ckpt_seq: int, nentries: int, payload: bytes,
                 next_page: int, next_npages: int, page_size: int) -> bytes:
    """A chunk padded to whole pages; the CRC32C covers header and payload."""
    hdr0 = _CH.pack(CKPT_MAGIC, 0, chunk_no, store_id, ckpt_seq, nentries, len(payload), next_page, next_npages)
    crc = crc32c(payload, crc32c(hdr0))
    out = hdr0[:8] + struct.pack("<I", crc) + hdr0[12:] + payload
    pad = -len(out) % page_size
    return out + bytes(pad)


def decode_chunk_header(buf) -> ChunkHeader | None:
    """Decode a chunk header (its CRC is checked against the payload by the caller)."""
    raw = bytes(buf[:CHUNK_HEADER_SIZE])
    if len(raw) < CHUNK_HEADER_SIZE or raw[:8] != CKPT_MAGIC:
        return None
    f = _CH.unpack(raw)
    return ChunkHeader(chunk_no=f[2], store_id=f[3], ckpt_seq=f[4], nentries=f[5], payload_len=f[6],
                       next_page=f[7], next_npages=f[8], crc=f[1])


def chunk_crc_ok(buf, hdr: ChunkHeader) -> bool:
    """Whether a chunk's CRC32C over header (crc zeroed) and payload matches."""
    raw = bytes(buf[:CHUNK_HEADER_SIZE])
    h0 = raw[:8] + b"\0\0\0\0" + raw[12:]
    payload = memoryview(buf)[CHUNK_HEADER_SIZE : CHUNK_HEADER_SIZE + hdr.payload_len]
    if len(payload) != hdr.payload_len:
        return False
    return crc32c(payload, crc32c(h0)) == hdr.crc
