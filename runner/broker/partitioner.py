"""Kafka's default partitioner: murmur2 of the key bytes, made positive, modulo partitions.

Both brokers partition with this, so a pipeline moved from the embedded broker to Kafka
keeps every key in the same partition (and Kafka's own clients agree with us).

- `murmur2` is a bit-exact port of Kafka's Java `org.apache.kafka.common.utils.Utils.murmur2`
  (32-bit signed result).
- `partition_for(key, n)` is `toPositive(murmur2(key)) % n`, as `BuiltInPartitioner`.
- Records without a key use a *sticky* partition, as Kafka's producer does: every keyless
  record of one `Partitioner.partition` call goes to the same partition, and the partition
  moves round-robin from one call (one batch) to the next.

It runs on every record, so the hot path is written for CPython: one `struct.unpack` for
all 4-byte blocks, unsigned arithmetic masked to 32 bits, and a per-call cache because keys
repeat a lot (see `Partitioner`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

__all__ = ["Partitioner", "murmur2", "murmur2_column", "partition_column", "partition_for", "partition_keys"]

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


# Pre-built unpackers for keys up to 255 bytes: formatting a struct per call costs more
# than the hashing of a short key.
_WORDS = [struct.Struct(f"<{n}I").unpack_from for n in range(64)]


def murmur2(data: bytes) -> int:
    """Kafka's `Utils.murmur2(byte[])`: a signed 32-bit int.

    Java works in wrapping signed 32-bit ints; here everything stays unsigned and masked
    to 32 bits (multiplication and xor agree bit for bit; Java's `>>>` is a logical shift,
    which is a plain `>>` on the unsigned value). Converted to signed at the end.
    """
    m = _M
    mask = _MASK
    length = len(data)
    h = _SEED ^ length
    n4 = length >> 2
    if n4:
        # Little-endian words, as the Java code assembles them byte by byte.
        words = _WORDS[n4](data) if n4 < 64 else struct.unpack_from(f"<{n4}I", data)
        for k in words:
            k = (k * m) & mask
            k = ((k ^ (k >> 24)) * m) & mask
            h = ((h * m) & mask) ^ k
    rest = length & 3
    if rest:
        i = length - rest
        # The Java switch falls through: 3 -> 2 -> 1, then multiplies once.
        if rest == 3:
            h ^= data[i + 2] << 16
        if rest >= 2:
            h ^= data[i + 1] << 8
        h = ((h ^ data[i]) * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - 0x100000000 if h & 0x80000000 else h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for a non-null key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class Partitioner:
    """Partitions a batch of keys; keeps the sticky partition for keyless records.

    One instance per producer (per source task): the sticky partition rotates
    round-robin between calls, so successive keyless batches spread over partitions.
    Hashes are cached across calls (keys repeat a lot: hosts, users, ids), in a dict
    that is simply dropped when it grows past `cache_size` entries.
    Not thread-safe (it is used from one coroutine at a time).
    """

    __slots__ = ("_sticky", "_hashes", "_cache_size")

    def __init__(self, start: int = 0, *, cache_size: int = 100_000) -> None:
        self._sticky = start
        self._hashes: dict[bytes, int] = {}
        self._cache_size = cache_size

    def partition(self, keys: Sequence[bytes | None], partitions: int) -> list[int]:
        """One partition per key, in order. Keys that are None share one partition."""
        if partitions <= 0:
            raise ValueError(f"partitions must be positive, got {partitions}")
        if partitions == 1:
            return [0] * len(keys)
        hashes = self._hashes
        if len(hashes) > self._cache_size:
            hashes.clear()
        get = hashes.get
        sticky = self._sticky % partitions
        sticky_used = False
        out: list[int] = []
        append = out.append
        for key in keys:
            h = get(key)  # type: ignore[arg-type]  # None is never stored
            if h is None:
                if key is None:
                    append(sticky)
                    sticky_used = True
                    continue
                h = hashes[key] = murmur2(key) & 0x7FFFFFFF
            append(h % partitions)
        if sticky_used:
            # The next batch of keyless records goes to the next partition.
            self._sticky = (sticky + 1) % partitions
        return out

    def partition_column(self, keys: pa.Array, partitions: int) -> np.ndarray:
        """`partition` for an Arrow string or binary array of keys, vectorised."""
        if partitions <= 0:
            raise ValueError(f"partitions must be positive, got {partitions}")
        sticky = self._sticky % partitions
        out = partition_column(keys, partitions, sticky)
        if keys.null_count and partitions > 1:
            self._sticky = (sticky + 1) % partitions
        return out


# A module-level partitioner for callers that do not keep their own (its sticky
# partition rotates across all such callers, which is fine: keyless records have no
# placement promise beyond "spread over partitions").
_default = Partitioner()


def partition_keys(keys: Sequence[bytes | None], partitions: int) -> list[int]:
    """`Partitioner.partition` on a shared module-level partitioner."""
    return _default.partition(keys, partitions)


# -- vectorised, for a column of keys ------------------------------------------------------


def murmur2_column(keys: pa.Array) -> np.ndarray:
    """`murmur2` of every value of an Arrow string or binary array at once (numpy, uint32
    arithmetic that wraps as Java's ints do), as unsigned 32-bit ints; nulls hash as empty.

    One pass per 4-byte word of the longest key, each a handful of numpy operations over
    all keys: for short keys (hosts, ids) about 0.05 µs a key against 0.5 in Python.
    """
    keys = keys.cast(pa.binary()) if not pa.types.is_binary(keys.type) else keys
    n = len(keys)
    _, offsets_buffer, data_buffer = keys.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32, count=n + 1, offset=keys.offset * 4).astype(np.int64)
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    m = np.uint32(_M)
    h = np.uint32(_SEED) ^ lengths.astype(np.uint32)
    words = lengths >> 2
    for w in range(int(words.max(initial=0))):
        has = words > w
        at = starts[has] + 4 * w
        k = (data[at].astype(np.uint32) | (data[at + 1].astype(np.uint32) << 8)
             | (data[at + 2].astype(np.uint32) << 16) | (data[at + 3].astype(np.uint32) << 24))
        k = k * m
        k = (k ^ (k >> np.uint32(24))) * m
        h[has] = (h[has] * m) ^ k
    rest = lengths & 3
    tail = starts + (words << 2)
    for size in (3, 2, 1):  # Java's switch falls through: 3 -> 2 -> 1, then multiplies once
        has = rest >= size
        if size == 3:
            h[has] ^= data[tail[has] + 2].astype(np.uint32) << 16
        elif size == 2:
            h[has] ^= data[tail[has] + 1].astype(np.uint32) << 8
        else:
            h[has] = (h[has] ^ data[tail[has]].astype(np.uint32)) * m
    h ^= h >> np.uint32(13)
    h = h * m
    h ^= h >> np.uint32(15)
    return h


def partition_column(keys: pa.Array, partitions: int, sticky: int) -> np.ndarray:
    """The partition of every key of an Arrow string or binary array (as `Partitioner`:
    Kafka's default partitioner), null keys on partition `sticky`."""
    if partitions == 1:
        return np.zeros(len(keys), dtype=np.int64)
    out = (murmur2_column(keys) & np.uint32(0x7FFFFFFF)).astype(np.int64) % partitions
    if keys.null_count:
        out[np.asarray(keys.is_null())] = sticky
    return out
