"""Host entropy coding of a ternary leaf: Golomb codes of the gaps between nonzeros, split into fixed-layout streams.

A ternary leaf (ComPEFT, Yadav et al. 2023, Sec. 3) is a set of kept positions plus one sign bit per kept position.
For a mask of density d the information content is ``n * H(d)`` bits for the positions and ``n * d`` bits for the
signs: the bound ``H(d) + d`` bits per parameter.

Positions are coded as the gaps ``g_i = p_i - p_{i-1} - 1`` between consecutive kept positions with a Golomb code
of parameter ``m``. For a Bernoulli(d) mask the gaps are geometric, and the Golomb code with
``m = ceil(log(1 + theta) / -log(theta))``, ``theta = 1 - d`` is the optimal prefix code for that source
(Gallager & van Voorhis, 1975). Unlike Golomb-Rice (``m`` a power of two, up to ~3% above the bound), the general
``m`` (truncated-binary remainders) stays within ~1% of ``H(d) + d`` from d = 0.001 to d = 0.3. ``m`` is chosen per
leaf from its actual density and checked against its neighbours on the leaf's own gaps.

The classic Golomb code interleaves each symbol's unary quotient and truncated-binary remainder, which forces a
sequential decoder. Here every code word is split across four bit streams so that encoding *and* decoding are a
handful of vectorised numpy passes (no Python loop over symbols), with exactly the same number of bits:

``unary``  quotient ``q_i = g_i // m`` as ``q_i`` zeros then a one; decode: positions of the ones.
``low``    the first ``b - 1`` bits of the truncated-binary remainder (``b = ceil(log2 m)``), fixed width.
``extra``  the last bit of the remainder, only for symbols whose ``low`` value is ``>= c = 2**b - m``.
``signs``  one bit per kept position (1 = negative), in position order.

Masks denser than 1/2 code the gaps between the *unkept* positions instead (the bound is symmetric in d), and a
leaf whose coded size would exceed the plain bitmap is stored as the plain bitmap.

Leaf blob layout (little-endian)::

    header  <4s B B H Q Q Q Q Q  : magic b"MJTC", version, mode, reserved, n, nnz, nsym, m, unary_bits
    payload unary | low | extra | signs   (each padded to a whole byte)

Bitmaps on the host use the device layout of ``mergejax.ternary.device``: the last axis of the leaf packed into
little-endian uint32 words (bit ``j`` of word ``w`` is element ``32 w + j``), zero padding bits.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import numpy as np

__all__ = [
    "CodecError",
    "CODEC_VERSION",
    "MODE_GAPS_ONES",
    "MODE_GAPS_ZEROS",
    "MODE_BITMAP",
    "binary_entropy",
    "entropy_bound_bits",
    "golomb_parameter",
    "golomb_bits",
    "encode_positions",
    "decode_positions",
    "encode_leaf",
    "decode_leaf",
    "leaf_nnz",
    "packed_shape",
    "FORMAT_VERSION",
]

CODEC_VERSION = 1
MAGIC = b"MJTC"
MODE_GAPS_ONES = 0  # Golomb-coded gaps between kept positions
MODE_GAPS_ZEROS = 1  # Golomb-coded gaps between unkept positions (density > 1/2)
MODE_BITMAP = 2  # plain packed bitmap (never larger than n bits)
_HEADER = struct.Struct("<4sBBHQQQQQ")
_SAMPLE = 1 << 18  # gaps used to compare candidate Golomb parameters


class CodecError(ValueError):
    """A coded leaf is malformed, truncated or inconsistent with its declared shape."""


class Header(NamedTuple):
    """The fixed part of a coded leaf."""

    mode: int
    n: int
    nnz: int
    nsym: int
    m: int
    unary_bits: int


# ----------------------------------------------------------------------------------------------------------- bounds
def binary_entropy(d: float) -> float:
    """H(d) = -d log2 d - (1-d) log2 (1-d) in bits, with H(0) = H(1) = 0."""
    if d <= 0.0 or d >= 1.0:
        return 0.0
    return -d * math.log2(d) - (1.0 - d) * math.log2(1.0 - d)


def entropy_bound_bits(n: int, nnz: int) -> float:
    """The ComPEFT entropy bound of one leaf in bits: ``n * H(nnz / n) + nnz`` (positions plus one sign each)."""
    if n == 0:
        return 0.0
    return n * binary_entropy(nnz / n) + nnz


def index_dtype(n: int) -> np.dtype:
    """int32 while every position and unary-stream offset of an ``n``-element leaf fits (much faster division)."""
    return np.dtype(np.int32) if 2 * n + 64 < 2**31 else np.dtype(np.int64)


# ---------------------------------------------------------------------------------------------------------- golomb
def golomb_parameter(n: int, nsym: int) -> int:
    """The optimal Golomb parameter for ``nsym`` geometric gaps spread over ``n`` positions.

    With ``theta = 1 - nsym / n`` the smallest ``m`` with ``theta**m + theta**(m+1) <= 1``
    (Gallager & van Voorhis, 1975): ``m = ceil(log(1 + theta) / -log(theta))``.
    """
    if nsym <= 0 or nsym >= n:
        return 1
    theta = 1.0 - nsym / n
    return max(1, math.ceil(math.log1p(theta) / -math.log(theta) - 1e-12))


def _widths(m: int) -> tuple[int, int]:
    """(w, c): ``low`` width ``b - 1`` and the truncated-binary cut ``c = 2**b - m`` for parameter ``m``."""
    if m <= 1:
        return 0, 0
    b = (m - 1).bit_length()  # ceil(log2 m)
    return b - 1, (1 << b) - m


def golomb_bits(gaps: np.ndarray, m: int) -> int:
    """Exact size in bits of the Golomb code of ``gaps`` with parameter ``m`` (unary + low + extra)."""
    gaps = np.asarray(gaps)
    w, c = _widths(m)
    q = gaps // gaps.dtype.type(m)
    extra = 0 if m == 1 else int(np.count_nonzero(_low_value(gaps - q * gaps.dtype.type(m), c) >= c))
    return int(q.sum(dtype=np.int64)) + gaps.size * (1 + w) + extra


def _low_value(r: np.ndarray, c: int) -> np.ndarray:
    """The ``b - 1`` leading bits of the truncated-binary code of remainder ``r``."""
    return np.where(r < c, r, (r + c) >> 1)


def _best_parameter(gaps: np.ndarray, n: int) -> int:
    """The Golomb parameter: the geometric optimum checked against its neighbours on (a sample of) the gaps."""
    m0 = golomb_parameter(n, gaps.size)
    sample = gaps if gaps.size <= _SAMPLE else gaps[:: gaps.size // _SAMPLE + 1]
    candidates = sorted({max(1, m0 - 1), m0, m0 + 1})
    return min(candidates, key=lambda m: (golomb_bits(sample, m), m))


# ------------------------------------------------------------------------------------------------------ bit streams
def _pack_bits(bits: np.ndarray) -> bytes:
    return np.packbits(bits.view(np.uint8) if bits.dtype == bool else bits, bitorder="little").tobytes()


def _unpack_bits(buf: memoryview, nbits: int) -> np.ndarray:
    """``nbits`` little-endian bits of ``buf`` as a bool array."""
    raw = np.frombuffer(buf, np.uint8, count=(nbits + 7) // 8)
    return np.unpackbits(raw, count=nbits, bitorder="little").view(bool)


def _uint_for(width: int) -> type:
    return np.uint8 if width <= 8 else (np.uint16 if width <= 16 else (np.uint32 if width <= 32 else np.uint64))


def _pack_fixed(values: np.ndarray, width: int) -> bytes:
    """Packs ``values`` (< 2**width) as consecutive little-endian ``width``-bit fields."""
    if width == 0 or values.size == 0:
        return b""
    if width == 8:
        return values.astype(np.uint8).tobytes()
    if width == 16:
        return values.astype("<u2").tobytes()
    small = _uint_for(width)
    v = values.astype(small)
    if width == 1:
        return _pack_bits(v)
    bits = (v[:, None] >> np.arange(width, dtype=small)) & small(1)
    return _pack_bits(bits.astype(np.uint8, copy=False).ravel())


def _unpack_fixed(buf: memoryview, count: int, width: int, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`_pack_fixed` (``buf`` may be longer than the fields)."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype)
    nbytes = _nbytes(count * width)
    if width == 1:
        return _unpack_bits(buf, count).astype(dtype)
    if width == 8:
        return np.frombuffer(buf, np.uint8, count=count).astype(dtype)
    if width == 16:
        return np.frombuffer(buf, "<u2", count=count).astype(dtype)
    if width <= 24:  # gather the (at most 4) bytes that hold each field
        raw = np.zeros(nbytes + 4, np.uint8)
        raw[:nbytes] = np.frombuffer(buf, np.uint8, count=nbytes)
        bit = np.arange(count, dtype=np.int64) * width
        byte, shift = bit >> 3, (bit & 7).astype(np.uint32)
        word = raw[byte].astype(np.uint32)
        for j in range(1, (width + 7 + 7) // 8):
            word |= raw[byte + j].astype(np.uint32) << np.uint32(8 * j)
        return ((word >> shift) & np.uint32((1 << width) - 1)).astype(dtype)
    bits = _unpack_bits(buf, count * width).reshape(count, width).astype(np.uint64)
    return (bits << np.arange(width, dtype=np.uint64)).sum(axis=1, dtype=np.uint64).astype(dtype)


def _nbytes(nbits: int) -> int:
    return (nbits + 7) // 8


# -------------------------------------------------------------------------------------------------------- positions
def encode_positions(positions: np.ndarray, n: int) -> tuple[int, int, bytes, bytes, bytes]:
    """Golomb-codes sorted distinct positions in ``[0, n)``.

    Returns:
      ``(m, unary_bits, unary, low, extra)``: the parameter, the number of bits of the unary stream, and the three
      byte strings.
    """
    dt = index_dtype(n)
    positions = np.asarray(positions).astype(dt, copy=False)
    if positions.size == 0:
        return 1, 0, b"", b"", b""
    gaps = np.diff(positions, prepend=dt.type(-1))
    gaps -= 1
    m = _best_parameter(gaps, n)
    w, c = _widths(m)
    if m == 1:
        q = gaps
    else:
        q = gaps // dt.type(m)
        r = (gaps - q * dt.type(m)).astype(np.uint8 if m <= 128 else dt)  # narrow: less memory traffic
    q += 1
    ends = np.cumsum(q, dtype=dt)  # one past each terminating one of the unary stream
    unary_bits = int(ends[-1])
    ends -= 1
    unary = np.zeros(unary_bits, np.uint8)
    unary[ends] = 1
    if m == 1:
        return m, unary_bits, _pack_bits(unary), b"", b""
    if c == 0:  # m a power of two: every remainder has b bits
        low, extra_bits = r >> 1, r & 1
    else:
        low = _low_value(r, r.dtype.type(c))
        extra_bits = np.compress(low >= c, (r + r.dtype.type(c)) & 1)
    return m, unary_bits, _pack_bits(unary), _pack_fixed(low, w), _pack_bits(extra_bits.astype(np.uint8))


def _decode_gaps(buf: memoryview, nsym: int, m: int, unary_bits: int, dt: np.dtype) -> tuple[np.ndarray, int]:
    """Decodes ``nsym`` gaps from ``unary | low | extra``; returns (gaps, bytes consumed)."""
    off = _nbytes(unary_bits)
    if len(buf) < off:
        raise CodecError(f"unary stream truncated: need {off} bytes, have {len(buf)}")
    ones = np.flatnonzero(_unpack_bits(buf[:off], unary_bits)).astype(dt)
    if ones.size != nsym or (nsym and ones[-1] != unary_bits - 1):
        raise CodecError(f"unary stream holds {ones.size} code words, header says {nsym}")
    q = np.diff(ones, prepend=dt.type(-1))
    q -= 1
    if m == 1:
        return q, off
    w, c = _widths(m)
    low_bytes = _nbytes(nsym * w)
    if len(buf) < off + low_bytes:
        raise CodecError(f"remainder stream truncated: need {off + low_bytes} bytes, have {len(buf)}")
    r = _unpack_fixed(buf[off : off + low_bytes], nsym, w, dt)
    off += low_bytes
    idx = np.flatnonzero(r >= c)
    extra_bytes = _nbytes(idx.size)
    if len(buf) < off + extra_bytes:
        raise CodecError(f"extra-bit stream truncated: need {off + extra_bytes} bytes, have {len(buf)}")
    extra = _unpack_bits(buf[off : off + extra_bytes], idx.size).astype(dt)
    off += extra_bytes
    r[idx] = ((r[idx] << 1) | extra) - c
    q *= dt.type(m)
    q += r
    return q, off


def _positions_from_gaps(gaps: np.ndarray, n: int) -> np.ndarray:
    if gaps.size and gaps.min() < 0:
        raise CodecError("negative gap decoded: corrupted stream")
    gaps += 1
    pos = np.cumsum(gaps, dtype=np.int64 if gaps.dtype == np.int64 else gaps.dtype)
    pos -= 1
    if pos.size and (pos[-1] >= n or pos[-1] < 0):
        raise CodecError(f"decoded position {int(pos[-1])} outside a leaf of {n} elements")
    return pos


def decode_positions(buf: bytes | memoryview, nsym: int, m: int, unary_bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`encode_positions`: the sorted positions, checked to lie in ``[0, n)``."""
    gaps, _ = _decode_gaps(memoryview(buf), nsym, m, unary_bits, index_dtype(n))
    return _positions_from_gaps(gaps, n)


FORMAT_VERSION = 1
"""Version of the ternary on-disk format (the coded streams and their metadata)."""


# ----------------------------------------------------------------------------------------------------- bitmap layout
def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the uint32 bitmap of a leaf: the last axis packed 32 per word (a scalar counts as shape (1,))."""
    shape = tuple(int(s) for s in shape) or (1,)
    return shape[:-1] + ((shape[-1] + 31) // 32,)


def leaf_nnz(mask_words: np.ndarray) -> int:
    """Number of set bits of a bitmap."""
    return int(np.bitwise_count(np.ascontiguousarray(mask_words)).sum(dtype=np.int64))


def _last(shape: tuple[int, ...]) -> int:
    return (tuple(shape) or (1,))[-1]


def _bits_of(words: np.ndarray) -> np.ndarray:
    """The bitmap as one bool per padded position (little-endian bit order)."""
    return np.unpackbits(np.ascontiguousarray(words, dtype="<u4").view(np.uint8), bitorder="little").view(bool)


def _to_dense(pos: np.ndarray, last: int, padded_last: int) -> np.ndarray:
    if last == padded_last or pos.size == 0:
        return pos
    return pos - (pos // padded_last) * (padded_last - last)


def _to_padded(pos: np.ndarray, last: int, padded_last: int) -> np.ndarray:
    if last == padded_last or pos.size == 0:
        return pos
    return pos + (pos // last) * (padded_last - last)


def _words_from_bits(bits: np.ndarray, wshape: tuple[int, ...]) -> np.ndarray:
    return np.packbits(bits.view(np.uint8), bitorder="little").view("<u4").astype(np.uint32, copy=False).reshape(wshape)


def _leaf_geometry(shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int, int, int]:
    """(packed shape, n, last, padded last, rows) of a dense leaf shape."""
    wshape = packed_shape(shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    last = _last(shape)
    return wshape, n, last, wshape[-1] * 32, (n // last if last else 0)


# ------------------------------------------------------------------------------------------------------------- leaf
def encode_leaf(mask_words: np.ndarray, sign_words: np.ndarray, shape: tuple[int, ...]) -> bytes:
    """Entropy-codes one leaf's bitmaps (device layout) into a self-describing blob.

    Args:
      mask_words: uint32 array of shape ``packed_shape(shape)``: kept (nonzero) positions.
      sign_words: uint32 array of the same shape: 1 where the kept value is negative (ignored elsewhere).
      shape: the dense leaf shape.

    Returns:
      The blob; its size is within ~1% of ``entropy_bound_bits(n, nnz) / 8`` bytes (plus a 48-byte header) for
      random masks of density 0.001 to 1, and never more than the plain bitmaps.
    """
    shape = tuple(int(s) for s in shape)
    wshape, n, last, padded_last, _ = _leaf_geometry(shape)
    mask_words = np.ascontiguousarray(mask_words, np.uint32)
    sign_words = np.ascontiguousarray(sign_words, np.uint32)
    if mask_words.shape != wshape or sign_words.shape != wshape:
        raise CodecError(f"bitmaps {mask_words.shape}/{sign_words.shape} do not match leaf shape {shape} -> {wshape}")
    dt = index_dtype(mask_words.size * 32)
    nnz = leaf_nnz(mask_words)
    bits = None
    if nnz == 0:
        ones = np.zeros(0, dt)
    elif nnz * 32 < n:  # sparse: visit the nonzero bytes only
        ones = _sparse_positions(mask_words).astype(dt, copy=False)
    else:
        bits = _bits_of(mask_words)
        ones = np.flatnonzero(bits).astype(dt, copy=False)
    if bits is not None:  # dense: gather from the unpacked sign bits
        signs = _bits_of(sign_words)[ones]
    else:
        flat_signs = sign_words.reshape(-1)
        signs = (flat_signs[ones >> 5] >> (ones & 31).astype(np.uint32)) & np.uint32(1)
    if nnz * 2 <= n:
        mode, symbols = MODE_GAPS_ONES, _to_dense(ones, last, padded_last)
    else:
        if bits is None:
            bits = _bits_of(mask_words)
        unkept = np.logical_not(bits).reshape(-1, padded_last)[:, :last]  # padding is not a symbol
        mode, symbols = MODE_GAPS_ZEROS, np.flatnonzero(unkept).astype(dt, copy=False)
    m, unary_bits, unary, low, extra = encode_positions(symbols, n)
    payload = unary + low + extra
    nsym = int(symbols.size)
    if len(payload) > _nbytes(n):  # the plain bitmap is smaller
        if bits is None:
            bits = _bits_of(mask_words)
        dense = np.ascontiguousarray(bits.reshape(-1, padded_last)[:, :last])
        mode, nsym, m, unary_bits, payload = MODE_BITMAP, 0, 0, 0, _pack_bits(dense.reshape(-1))
    header = _HEADER.pack(MAGIC, CODEC_VERSION, mode, 0, n, nnz, nsym, m, unary_bits)
    return header + payload + _pack_bits(signs.astype(np.uint8))


def _sparse_positions(words: np.ndarray) -> np.ndarray:
    """Set-bit positions of a sparse bitmap: nonzero bytes, then their bits (O(nonzero bytes))."""
    by = np.ascontiguousarray(words, "<u4").view(np.uint8).reshape(-1)
    nz = np.flatnonzero(by)
    bits = np.unpackbits(by[nz][:, None], axis=1, bitorder="little").view(bool)
    return ((nz << 3)[:, None] + np.arange(8, dtype=np.int64))[bits]


def read_header(blob: bytes | memoryview) -> Header:
    """Parses and checks the fixed header of a coded leaf."""
    if len(blob) < _HEADER.size:
        raise CodecError(f"blob of {len(blob)} bytes is shorter than the {_HEADER.size}-byte header (truncated)")
    magic, version, mode, _, n, nnz, nsym, m, unary_bits = _HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r} (expected {MAGIC!r}): not a mergejax ternary leaf, or corrupted")
    if version != CODEC_VERSION:
        raise CodecError(f"codec version {version} is not supported (this build reads {CODEC_VERSION})")
    if mode not in (MODE_GAPS_ONES, MODE_GAPS_ZEROS, MODE_BITMAP) or nnz > n or nsym > n or unary_bits > 2 * n + 64:
        raise CodecError(f"inconsistent header: mode={mode} n={n} nnz={nnz} nsym={nsym} unary_bits={unary_bits}")
    return Header(mode, n, nnz, nsym, m, unary_bits)


def decode_leaf(blob: bytes | memoryview, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_leaf`: ``(mask_words, sign_words)`` in the device layout.

    Raises:
      CodecError: the blob is truncated, has trailing bytes, or disagrees with ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    wshape, n, last, padded_last, rows = _leaf_geometry(shape)
    buf = memoryview(blob)
    h = read_header(buf)
    if h.n != n:
        raise CodecError(f"blob holds {h.n} elements, leaf shape {shape} has {n}")
    body = buf[_HEADER.size :]
    dt = index_dtype(rows * padded_last)
    if h.mode == MODE_BITMAP:
        off = _nbytes(n)
        if len(body) < off:
            raise CodecError(f"bitmap truncated: need {off} bytes, have {len(body)}")
        mbits = np.zeros((rows, padded_last), bool)
        mbits[:, :last] = _unpack_bits(body[:off], n).reshape(rows, last)
        mbits = mbits.reshape(-1)
        ones = np.flatnonzero(mbits)
    else:
        if h.nsym and h.m < 1:
            raise CodecError(f"invalid Golomb parameter {h.m}")
        gaps, off = _decode_gaps(body, h.nsym, max(h.m, 1), h.unary_bits, dt)
        pos = _to_padded(_positions_from_gaps(gaps, n), last, padded_last)
        if h.mode == MODE_GAPS_ONES:
            ones = pos
            mbits = np.zeros(rows * padded_last, bool)
            mbits[ones] = True
        else:
            mbits = np.zeros((rows, padded_last), bool)
            mbits[:, :last] = True
            mbits = mbits.reshape(-1)
            mbits[pos] = False
            ones = np.flatnonzero(mbits)
    if ones.size != h.nnz:
        raise CodecError(f"decoded {ones.size} nonzeros, header says {h.nnz}")
    sign_bytes = _nbytes(h.nnz)
    if len(body) != off + sign_bytes:
        what = "truncated" if len(body) < off + sign_bytes else "has trailing bytes"
        raise CodecError(f"sign stream {what}: expected {off + sign_bytes} payload bytes, have {len(body)}")
    sbits = np.zeros(rows * padded_last, bool)
    sbits[ones] = _unpack_bits(body[off:], h.nnz)
    return _words_from_bits(mbits, wshape), _words_from_bits(sbits, wshape)
