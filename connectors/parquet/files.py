"""The parquet sink's files on disk: their names, the scan of a topic's directory, the
repair on open (the recovery the module doc of `connectors.parquet` describes), the lock
that `open` and compaction share, and fsync."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from runner.connector import FatalError, TopicPartition

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock (one process at a time)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("pipeline.parquet")

FINAL = re.compile(
    r"^(?P<topic>.+)\+(?P<partition>\d+)\+(?P<first>\d{20})\+(?P<last>\d{20})"
    r"(?:\+(?P<k>\d+)of(?P<n>\d+))?\.parquet$"
)
TEMP = re.compile(r"^\.(?P<final>.+\.parquet)\.tmp$")
# A file of a group still being written (its last offset is not known yet).
OPEN = re.compile(r"^\.(?P<topic>.+)\+(?P<partition>\d+)\+(?P<first>\d{20})\+open\+(?P<seq>\d+)\.parquet\.tmp$")
LOCK = ".pipeline.lock"

# File metadata (Parquet key-value metadata of the footer).
META_TOPIC = "pipeline.topic"
META_PARTITION = "pipeline.partition"
META_OFFSETS = "pipeline.offsets"  # "<first>-<last>" of the file's group
META_FILE = "pipeline.file"  # "<k>/<n>"
META_COMPACTED = "pipeline.compacted"  # a merged file: JSON [[first, last], ...] of the groups it holds

Group = tuple[int, int, int]  # (first, last, n): a group's key


def file_name(tp: TopicPartition, first: int, last: int, k: int, n: int) -> str:
    base = f"{tp.topic}+{tp.partition}+{first:020d}+{last:020d}"
    return f"{base}.parquet" if n == 1 else f"{base}+{k}of{n}.parquet"


def open_name(tp: TopicPartition, first: int, seq: int) -> str:
    return f".{tp.topic}+{tp.partition}+{first:020d}+open+{seq}.parquet.tmp"


def temp_name(final: str) -> str:
    return f".{final}.tmp"


def group_meta(tp: TopicPartition, first: int, last: int, k: int, n: int) -> dict[str, str]:
    return {
        META_TOPIC: tp.topic,
        META_PARTITION: str(tp.partition),
        META_OFFSETS: f"{first}-{last}",
        META_FILE: f"{k}/{n}",
    }


def strip_meta(metadata: dict[bytes, bytes] | None) -> dict[bytes, bytes] | None:
    """Schema metadata without the pipeline's own keys (older versions put them there)."""
    if not metadata:
        return metadata
    kept = {k: v for k, v in metadata.items() if not k.startswith(b"pipeline.")}
    return kept or None


@dataclass
class Found:
    """The files of one tp found in its topic's directory, grouped: (first, last, n) -> {k: path}."""

    finals: dict[Group, dict[int, Path]] = field(default_factory=dict)
    temps: dict[Group, dict[int, Path]] = field(default_factory=dict)
    opens: list[Path] = field(default_factory=list)  # files of groups that were being written

    def complete(self) -> set[Group]:
        return {g for g, files in self.finals.items() if len(files) == g[2]}


def scan(root: Path, topic: str, wanted: set[TopicPartition] | None = None) -> dict[TopicPartition, Found]:
    """The sink's files under `root` (= <path>/<topic>), per tp (those in `wanted`, or all)."""
    found: dict[TopicPartition, Found] = {}
    if not root.is_dir():
        return found
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name[0] == "." and (o := OPEN.match(name)):
                tp = TopicPartition(topic, int(o.group("partition")))
                if o.group("topic") == topic and (wanted is None or tp in wanted):
                    found.setdefault(tp, Found()).opens.append(Path(dirpath) / name)
                continue
            temp = TEMP.match(name)
            m = FINAL.match(temp.group("final") if temp else name)
            if not m or m.group("topic") != topic:
                continue
            tp = TopicPartition(topic, int(m.group("partition")))
            if wanted is not None and tp not in wanted:
                continue
            n = int(m.group("n") or 1)
            k = int(m.group("k") or 1)
            key = (int(m.group("first")), int(m.group("last")), n)
            f = found.setdefault(tp, Found())
            (f.temps if temp else f.finals).setdefault(key, {})[k] = Path(dirpath) / name
    return found


def compacted_from(path: Path) -> set[tuple[int, int]]:
    """The (first, last) of the groups a merged file's group holds (empty if it is not one)."""
    try:
        meta = pq.read_metadata(path).metadata or {}
        return {tuple(r) for r in json.loads(meta.get(META_COMPACTED.encode(), b"[]"))}
    except (OSError, ValueError, TypeError):
        return set()


def leftovers(
    tp: TopicPartition, finals: dict[Group, dict[int, Path]], complete: set[Group], root: Path
) -> dict[Group, list[Group]]:
    """Groups left behind by a compaction that stopped between making its merged group
    durable and deleting the groups it merged: {merged group: [groups it holds that still
    have files]}. Such a group lies inside a complete group whose files name it among the
    groups they merged (footer key `pipeline.compacted`), with its files in directories of
    that group; it may have lost some of its files already. Any other overlap of complete
    groups is an error: the output would hold records twice."""
    found: dict[Group, list[Group]] = {}
    cover: Group | None = None
    merged: set[tuple[int, int]] | None = None
    for g in sorted(finals, key=lambda g: (g[0], -g[1], g not in complete)):
        if cover is None or g[0] > cover[1]:
            if g in complete:
                cover, merged = g, None
            continue
        if g[1] <= cover[1]:
            if merged is None:
                merged = compacted_from(next(iter(finals[cover].values())))
            dirs = {p.parent for p in finals[cover].values()}
            if (g[0], g[1]) in merged and {p.parent for p in finals[g].values()} <= dirs:
                found.setdefault(cover, []).append(g)
                continue
        if g in complete:
            raise FatalError(
                f"parquet sink: {tp}: files of offsets {cover[0]}..{cover[1]} and {g[0]}..{g[1]} "
                "overlap: the output holds records twice (two pipelines writing one "
                "directory?)",
                hint=f"give each pipeline its own path, or move {root} away",
            )
    return found


def roll_forward(found: Found, group: Group, touched: set[Path]) -> bool:
    """Complete a group cut during its renames, when every missing file is still there as
    a temp (all of them were durable before the first rename); False if it cannot be."""
    files = found.finals[group]
    missing = set(range(1, group[2] + 1)) - set(files)
    temps = found.temps.get(group, {})
    if not missing <= set(temps):
        return False
    for k in sorted(missing):
        tmp = temps.pop(k)
        final = tmp.with_name(TEMP.match(tmp.name).group("final"))
        os.replace(tmp, final)
        files[k] = final
        touched.add(tmp.parent)
    return True


def recover(root: Path, tp: TopicPartition, found: Found) -> int:
    """Repair the output of `tp` after a crash (see the package doc); its resume offset.
    The caller holds the topic's lock."""
    touched: set[Path] = set()
    complete = set()
    broken = []
    for group, files in found.finals.items():
        if len(files) == group[2]:
            complete.add(group)
        elif roll_forward(found, group, touched):
            complete.add(group)
            log.info("parquet sink: %s: completed the interrupted group %d..%d", tp, group[0], group[1])
        else:
            broken.append(group)
    for merged, covered in leftovers(tp, found.finals, complete, root).items():
        for group in covered:
            for path in found.finals.pop(group).values():
                path.unlink(missing_ok=True)
                touched.add(path.parent)
            complete.discard(group)
        broken = [g for g in broken if g in found.finals]
        log.info(
            "parquet sink: %s: removed %d group(s) already merged into %d..%d (an interrupted compaction)",
            tp, len(covered), merged[0], merged[1],
        )
    top = max((g[1] for g in complete), default=-1)
    for group in broken:
        if group[0] <= top:
            raise FatalError(
                f"parquet sink: {tp}: the files of offsets {group[0]}..{group[1]} are "
                f"incomplete ({len(found.finals[group])} of {group[2]}) and later offsets "
                "are written: the output was changed outside the pipeline",
                hint=f"move {root} away to rewrite this topic",
            )
        for path in found.finals[group].values():
            path.unlink()
            touched.add(path.parent)
        log.warning("parquet sink: %s: removed an incomplete group %d..%d", tp, group[0], group[1])
    for temps in found.temps.values():
        for path in temps.values():
            path.unlink(missing_ok=True)
            touched.add(path.parent)
    for path in found.opens:
        path.unlink(missing_ok=True)
        touched.add(path.parent)
    for d in touched:
        fsync_dir(d)
    return top + 1


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the topic directory's lock (`<path>/<topic>/.pipeline.lock`, flock): the sink
    takes it while it scans and repairs its files on open, compaction while it changes
    them, so the two never race (across processes too)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Two names for one call: files and directories are fsynced at different steps of a group
# write, and the crash tests fail each step on its own.
def fsync_file(path: Path) -> None:
    _fsync(path)


def fsync_dir(directory: Path) -> None:
    _fsync(directory)
