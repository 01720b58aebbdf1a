"""Kafka's default partitioner: murmur2 must agree bit for bit with Kafka's Java client."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from runner.broker.partitioner import Partitioner, murmur2, partition_for, partition_keys

# From Kafka's own test suite (clients UtilsTest.testMurmur2).
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize("data,expected", sorted(KAFKA_VECTORS.items()))
def test_murmur2_matches_kafka_vectors(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


def test_murmur2_agrees_with_aiokafka_for_every_tail_length() -> None:
    # An independent port (aiokafka's, unsigned result): all lengths 0..300 cover every
    # tail case (0-3 leftover bytes) and keys past the pre-built unpackers (> 255 bytes).
    rng = random.Random(7)
    for length in range(301):
        data = bytes(rng.randrange(256) for _ in range(length))
        assert murmur2(data) & 0xFFFFFFFF == aiokafka_murmur2(data), length


def test_murmur2_is_signed_32_bit() -> None:
    rng = random.Random(1)
    values = [murmur2(rng.randbytes(rng.randrange(1, 40))) for _ in range(2000)]
    assert all(-(2**31) <= v < 2**31 for v in values)
    assert any(v < 0 for v in values) and any(v > 0 for v in values)


def test_partition_for_is_kafka_to_positive_modulo() -> None:
    for key, h in KAFKA_VECTORS.items():
        for n in (1, 3, 8, 12):
            assert partition_for(key, n) == (h & 0x7FFFFFFF) % n
    assert partition_for(b"21", 8) == 4  # (-973932308 & 0x7fffffff) % 8


def test_partition_for_spreads_keys_evenly() -> None:
    counts = Counter(partition_for(f"user-{i}".encode(), 8) for i in range(16000))
    assert sorted(counts) == list(range(8))
    assert all(1700 < c < 2300 for c in counts.values()), counts


def test_partitioner_matches_partition_for_and_keeps_keys_together() -> None:
    keys = [f"host-{i % 37}".encode() for i in range(1000)]
    parts = Partitioner().partition(keys, 6)
    assert parts == [partition_for(k, 6) for k in keys]
    # Same answer the second time (from the cache) and for another partition count.
    p = Partitioner()
    assert p.partition(keys, 6) == parts
    assert p.partition(keys, 5) == [partition_for(k, 5) for k in keys]


def test_keyless_records_stick_within_a_call_and_rotate_between_calls() -> None:
    p = Partitioner()
    seen = []
    for _ in range(4):
        parts = p.partition([None, b"a", None, None, b"b", None], 4)
        sticky = {parts[i] for i in (0, 2, 3, 5)}
        assert len(sticky) == 1
        assert parts[1] == partition_for(b"a", 4) and parts[4] == partition_for(b"b", 4)
        seen.append(sticky.pop())
    assert sorted(seen) == [0, 1, 2, 3]
    # A call without keyless records does not move the sticky partition.
    p.partition([b"x"], 4)
    assert p.partition([None], 4) == [seen[0]]


def test_partitioner_edge_cases() -> None:
    p = Partitioner()
    assert p.partition([], 3) == []
    assert p.partition([None, b"k"], 1) == [0, 0]
    assert p.partition([b""], 7) == [partition_for(b"", 7)]
    with pytest.raises(ValueError):
        p.partition([b"k"], 0)


def test_partition_keys_module_function() -> None:
    keys: list[bytes | None] = [b"a", b"b", None, b"a"]
    parts = partition_keys(keys, 3)
    assert parts[0] == parts[3] == partition_for(b"a", 3)
    assert parts[1] == partition_for(b"b", 3)
    assert 0 <= parts[2] < 3


def test_the_column_hash_is_kafkas_murmur2_bit_for_bit() -> None:
    """The vectorised murmur2 (pyarrow.compute, for columnar batches) against the scalar one,
    on random bytes of every length 0..40, on text, on a slice (an array with an offset),
    with null keys on the sticky partition."""
    import random

    import pyarrow as pa

    from runner.broker.partitioner import murmur2_column, partition_column

    rng = random.Random(7)
    keys = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40))) for _ in range(5000)]
    hashed = murmur2_column(pa.array(keys, pa.binary())).to_pylist()
    assert [h - (1 << 32) if h & 0x80000000 else h for h in hashed] == [murmur2(k) for k in keys]
    texts = [f"192.0.{rng.randint(0, 255)}.{rng.randint(0, 255)}" for _ in range(1000)] + ["", "ä😀"]
    column = pa.array([*texts, None])
    assert partition_column(column, 6, 4).to_pylist() == [partition_for(t.encode(), 6) for t in texts] + [4]
    assert partition_column(column.slice(3, 50), 5, 0).to_pylist() == [partition_for(t.encode(), 5) for t in texts[3:53]]
    assert murmur2_column(pa.array([], pa.binary())).to_pylist() == []
    sticky = Partitioner()
    assert sticky.partition_column(pa.array([None, None], pa.string()), 3).to_pylist() == [0, 0]
    assert sticky.partition_column(pa.array([None], pa.string()), 3).to_pylist() == [1]  # moves on, as partition()
