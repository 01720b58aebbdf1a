"""Consumer groups whose rebalances move only what changes hands.

aiokafka speaks Kafka's eager rebalance protocol: at every rebalance each member is told
its whole assignment is revoked, then given a new one. Kafka's answer, incremental
cooperative rebalancing (KIP-429), is not in aiokafka; this module builds its core on
what aiokafka does offer, a custom assignor and the members' metadata:

- Every member tells the group (in its JoinGroup metadata) which partitions it owns —
  holds and has not given up — and a note: its name, its spec's fingerprint, and what
  the group may need to know of it (source tasks it has finished, for `--once`).
- The leader shares the partitions out balanced and sticky (`share`): a member keeps
  what it owns up to its fair share. A partition that is to move while its owner is
  still in the group is not given to its new member in this round: it stays with its
  owner, who is asked to release it. The owner gives it up (a task stops, a sink
  flushes and commits it) while still holding it, then asks for another rebalance, in
  which it goes to its new member. Nothing is ever held by two members at once.
- Each member acts only on the difference (`KafkaMembership`): what it keeps runs on
  through the rebalance, untouched. A member that left or died owns nothing any more:
  its partitions are handed out at once.
- A member whose spec differs from the group's (the spec of the members already working;
  of the first member when none is) is given nothing and told why; it stops with that.

A member also keeps a fetch pending at all times (on nothing: its partitions are paused):
aiokafka takes a member that has not fetched for `max_poll_interval_ms` for a stuck one
and leaves the group.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTP
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata
from aiokafka.errors import CommitFailedError, IllegalStateError

from runner.broker.base import TopicPartition
from runner.errors import FatalError

log = logging.getLogger("pipeline.kafka")

TP = tuple[str, int]  # (topic, partition)
PROTOCOL = "pipeline-sticky"
# Seconds a member waits after a rebalance before it asks for another or leaves: a
# follower's SyncGroup may still be on its way, and some brokers (Tansu) drop it when the
# round changes under it, costing the follower a session timeout's worth of waiting.
SETTLE = 1.5


def member_name() -> str:
    """How a member is named in logs and status: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Member:
    """What a member tells the group when it joins."""

    owned: list[TP]
    note: dict[str, Any] = field(default_factory=dict)


@dataclass
class Share:
    """What the leader gives one member: `assigned` (everything it holds this round,
    `release` included) and `release` (what it is to give up)."""

    assigned: list[TP] = field(default_factory=list)
    release: list[TP] = field(default_factory=list)
    refused: dict[str, str] | None = None  # the group's spec, when this member's differs


def share(members: dict[str, Member], partitions: list[TP]) -> dict[str, Share]:
    """Share `partitions` among `members`, balanced (counts differ by one at most, and
    each topic's partitions spread as evenly) and sticky (a member keeps what it owns up
    to its fair share). A partition moving from a member still in the group stays with it
    this round, in its `release` list."""
    shares = {m: Share() for m in members}
    reference = _reference_spec(members)
    for m, member in members.items():
        if reference is not None and member.note.get("spec") != reference:
            shares[m].refused = reference
    working = sorted(m for m in members if shares[m].refused is None)
    if not working:
        return shares
    wanted = set(partitions)
    owner: dict[TP, str] = {}
    for m in working:
        for tp in sorted(map(tuple, members[m].owned)):
            if tp in wanted and tp not in owner:
                owner[tp] = m
    # Fair shares: q each, one more for r members (those owning most: fewer moves).
    q, r = divmod(len(partitions), len(working))
    by_owned = sorted(working, key=lambda m: (-sum(1 for o in owner.values() if o == m), m))
    cap = {m: q + (1 if i < r else 0) for i, m in enumerate(by_owned)}
    target: dict[TP, str] = {}
    held = {m: 0 for m in working}
    for tp, m in sorted(owner.items()):
        if held[m] < cap[m]:
            target[tp] = m
            held[m] += 1
    per_topic: Counter[tuple[str, str]] = Counter((m, tp[0]) for tp, m in target.items())
    # The rest, topics interleaved, each to the member below its cap with fewest of its topic.
    for tp in sorted((tp for tp in partitions if tp not in target), key=lambda tp: (tp[1], tp[0])):
        m = min((m for m in working if held[m] < cap[m]), key=lambda m: (per_topic[m, tp[0]], held[m], m))
        target[tp] = m
        held[m] += 1
        per_topic[m, tp[0]] += 1
    for tp, m in target.items():
        current = owner.get(tp)
        if current is not None and current != m:
            shares[current].assigned.append(tp)
            shares[current].release.append(tp)
        else:
            shares[m].assigned.append(tp)
    for s in shares.values():
        s.assigned.sort()
        s.release.sort()
    return shares


def _reference_spec(members: dict[str, Member]) -> dict[str, str] | None:
    """The spec the group runs: the most common among the members that own work (or,
    when none does, among all), ties to the first member's."""
    specs = {m: member.note.get("spec") for m, member in members.items() if member.note.get("spec") is not None}
    if not specs:
        return None
    working = [m for m in sorted(specs) if members[m].owned] or sorted(specs)
    counts = Counter(json.dumps(specs[m], sort_keys=True) for m in working)
    best = max(counts.values())
    first = next(m for m in working if counts[json.dumps(specs[m], sort_keys=True)] == best)
    return specs[first]


def spec_difference(mine: dict[str, str], group: dict[str, str]) -> str:
    """The parts of a spec fingerprint that differ from the group's, for a message."""
    parts = sorted(set(mine) | set(group))
    differ = [p for p in parts if mine.get(p) != group.get(p)]
    only_mine = [p for p in differ if p not in group]
    only_group = [p for p in differ if p not in mine]
    changed = [p for p in differ if p in mine and p in group]
    said = []
    if changed:
        said.append("differs in " + ", ".join(changed))
    if only_mine:
        said.append("has " + ", ".join(only_mine) + " which the others lack")
    if only_group:
        said.append("lacks " + ", ".join(only_group))
    return "; ".join(said)


@dataclass
class GroupView:
    """What every member learns at a rebalance: who holds what, and the notes' union of
    `done` (what members report finished)."""

    generation: int = -1
    members: list[dict[str, Any]] = field(default_factory=list)  # {"name", "assigned": [[topic, p]]}
    done: list[Any] = field(default_factory=list)
    release: list[TP] = field(default_factory=list)
    refused: dict[str, str] | None = None


class StickyAssignor(AbstractPartitionAssignor):
    """aiokafka's side of `share`: one instance per member (its metadata is the
    member's own state)."""

    name = PROTOCOL

    def __init__(self, membership: KafkaMembership) -> None:
        self.membership = membership
        self.view = GroupView()

    def metadata(self, topics: Any) -> ConsumerProtocolMemberMetadata:  # type: ignore[override]
        self.membership.holdings.joining()
        data = {"owned": self.membership.holdings.owned(), "note": self.membership.note()}
        return ConsumerProtocolMemberMetadata(0, sorted(topics), json.dumps(data).encode())

    def assign(self, cluster: Any, members: Any) -> dict[str, ConsumerProtocolMemberAssignment]:  # type: ignore[override]
        decoded = {}
        topics: set[str] = set()
        for m, metadata in members.items():
            try:
                data = json.loads(metadata.user_data or b"{}")
            except ValueError:
                data = {}
            decoded[m] = Member([tuple(tp) for tp in data.get("owned", [])], data.get("note") or {})
            topics.update(metadata.subscription)
        partitions = [(t, p) for t in sorted(topics) for p in sorted(cluster.partitions_for_topic(t) or ())]
        shares = share(decoded, partitions)
        done = sorted({json.dumps(d) for m, member in decoded.items() if shares[m].refused is None
                       for d in member.note.get("done", [])})
        members_view = [{"name": decoded[m].note.get("name", m), "assigned": shares[m].assigned}
                        for m in sorted(decoded) if shares[m].refused is None]
        out = {}
        for m, s in shares.items():
            by_topic: dict[str, list[int]] = {}
            for t, p in s.assigned:
                by_topic.setdefault(t, []).append(p)
            data = {"release": s.release, "members": members_view, "done": [json.loads(d) for d in done],
                    "refused": s.refused}
            out[m] = ConsumerProtocolMemberAssignment(0, sorted(by_topic.items()), json.dumps(data).encode())
        return out

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:  # type: ignore[override]
        try:
            data = json.loads(assignment.user_data or b"{}")
        except ValueError:
            data = {}
        self.view = GroupView(
            members=data.get("members", []),
            done=data.get("done", []),
            release=[tuple(tp) for tp in data.get("release", [])],
            refused=data.get("refused"),
        )


class Holdings:
    """What one member holds, and what the group was told of it (no I/O: the rules of
    `KafkaMembership`, on their own).

    A partition is *active* (this member works on it) when held and neither being
    released nor released. A released one stays out of work until a rebalance whose
    leader knew of the release (`told` reached the change that made it): before that,
    the leader may still list it as ours, from older metadata.
    """

    def __init__(self) -> None:
        self.held: set[TP] = set()  # in our assignment
        self.releasing: set[TP] = set()  # being given up (still owned)
        self.released: dict[TP, int] = {}  # given up, by the number of the change that did it
        # Changes of our own (a release done, a note changed), and how many of them the
        # group was told at our last join.
        self.changes = 0
        self.told = 0

    def owned(self) -> list[TP]:
        """What the group is told we own (a partition being released still is)."""
        return sorted(self.held - self.released.keys())

    def active(self) -> set[TP]:
        return self.held - self.releasing - self.released.keys()

    def joining(self) -> None:
        """Our metadata goes out: the group now knows every change so far."""
        self.told = self.changes

    def assigned(self, assigned: set[TP], release: set[TP]) -> tuple[set[TP], set[TP]]:
        """A rebalance's outcome: returns (lost: active partitions taken without a
        release, to release: active partitions the leader asks us to give up)."""
        lost = self.active() - assigned
        self.released = {tp: n for tp, n in self.released.items() if n > self.told and tp in assigned}
        self.held = set(assigned)
        to_release = release & self.active()
        self.releasing |= to_release
        return lost, to_release

    def release_done(self, partitions: set[TP], ok: bool) -> None:
        self.releasing -= partitions
        if ok:
            self.changes += 1
            self.released.update((tp, self.changes) for tp in partitions & self.held)

    @property
    def behind(self) -> bool:
        """The group has not been told every change: ask for a rebalance."""
        return self.told != self.changes


Changed = Callable[[list[TopicPartition]], Awaitable[None]]


class _Listener(ConsumerRebalanceListener):
    def __init__(self, membership: KafkaMembership) -> None:
        self.membership = membership

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass  # eager: "all revoked"; the member acts on the new assignment instead

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.membership._assigned({(tp.topic, tp.partition) for tp in assigned})


class KafkaMembership:
    """This process as a member of a consumer group whose rebalances are incremental (see
    the module docstring). It fetches nothing itself; it tells its owner what changed:

    - `release(partitions)`: give these up now — they are still held, so offsets may be
      committed; on return they are gone from here (another member gets them next round).
    - `assigned(partitions)`: the whole assignment after a rebalance (what was kept and
      what was gained), after `release`s were handled.
    - `lost(partitions)`: taken away without a release (this member was dropped from the
      group, e.g. it missed its heartbeats): write nothing more for them, commit nothing.

    `view` is what the last rebalance told everyone; `rejoin()` asks for a rebalance, so
    the group reads this member's note again.
    """

    def __init__(self, group: str, topics: list[str], settings: dict[str, Any],
                 note: Callable[[], dict[str, Any]] | None = None) -> None:
        self.group = group
        self.topics = topics
        self._note = note or dict
        self.holdings = Holdings()
        self.release_cb: Changed | None = None
        self.assigned_cb: Changed | None = None
        self.lost_cb: Changed | None = None
        self.failure: BaseException | None = None  # raised by a callback or a refusal
        self.settled_at = 0.0  # (loop time) when the last rebalance will have settled
        self._asking: asyncio.TimerHandle | None = None
        self.changed = asyncio.Event()  # set after each rebalance this member took part in
        self.joined = asyncio.Event()
        self.assignor = StickyAssignor(self)
        self.consumer = AIOKafkaConsumer(**settings, group_id=group, enable_auto_commit=False,
                                         partition_assignment_strategy=(self.assignor,))
        self._keepalive: asyncio.Task | None = None
        self._releases: set[asyncio.Task] = set()

    @property
    def view(self) -> GroupView:
        return self.assignor.view

    def note(self) -> dict[str, Any]:
        return {"name": member_name(), **self._note()}

    async def start(self) -> None:
        self.consumer.subscribe(self.topics, listener=_Listener(self))
        await self.consumer.start()
        self._keepalive = asyncio.create_task(self._keep_alive())
        await self.joined.wait()
        if self.failure is not None:
            raise self.failure

    async def _keep_alive(self) -> None:
        """A fetch always pending (on paused partitions: nothing comes), so aiokafka never
        takes this member for a stuck one."""
        while True:
            try:
                await self.consumer.getmany(timeout_ms=1000)
            except asyncio.CancelledError:
                raise
            except Exception:  # the consumer is stopping, or between assignments
                await asyncio.sleep(0.1)

    def rejoin(self) -> None:
        """Tell the group what changed here (the note, a release): a rebalance."""
        self.holdings.changes += 1
        self._ask()

    def _ask(self) -> None:
        """Ask for a rebalance once the last one has settled."""
        if self._asking is not None:
            return
        loop = asyncio.get_running_loop()

        def ask() -> None:
            self._asking = None
            # aiokafka has no public way (Java's enforceRebalance, KIP-568); its coordinator's
            # request_rejoin is what a metadata change uses internally.
            self.consumer._coordinator.request_rejoin()

        self._asking = loop.call_later(max(0.0, self.settled_at - loop.time()), ask)

    async def _assigned(self, assigned: set[TP]) -> None:
        self.settled_at = asyncio.get_running_loop().time() + SETTLE
        self.consumer.pause(*(KafkaTP(t, p) for t, p in assigned))  # only the keep-alive fetches
        view = self.view
        try:
            if view.refused is not None:
                mine = self.note().get("spec") or {}
                raise FatalError(
                    f"another process in group {self.group!r} runs a different spec of this pipeline: this one "
                    f"{spec_difference(mine, view.refused)}",
                    hint="run the same spec file in every process of a pipeline, or give this one another `name:`",
                )
            lost, release = self.holdings.assigned(assigned, set(view.release))
            if lost:
                log.warning("%s: lost %s without a release (this process was dropped from the group)",
                            self.group, ", ".join(f"{t}[{p}]" for t, p in sorted(lost)))
                if self.lost_cb is not None:
                    await self.lost_cb(_ours(lost))
            if self.assigned_cb is not None:
                await self.assigned_cb(_ours(self.holdings.active()))
            if release:
                task = asyncio.create_task(self._release(release))
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)
        except BaseException as exc:
            self.failure = exc  # aiokafka only logs what its callbacks raise
        finally:
            self.joined.set()
            self.changed.set()
        # aiokafka forgets a rejoin asked for while a join is under way: each rebalance
        # ends by asking again if the group is behind.
        if self.holdings.behind:
            self._ask()

    async def _release(self, partitions: set[TP]) -> None:
        try:
            if self.release_cb is not None:
                await self.release_cb(_ours(partitions))
        except Exception as exc:
            self.holdings.release_done(partitions, ok=False)
            self.failure = exc  # the owner raises it (a task is not awaited by anyone)
            self.changed.set()
            return
        self.holdings.release_done(partitions, ok=True)
        self._ask()

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit, for the partitions still held; a commit refused because a rebalance is
        under way is tried again once it is over (what is held keeps being held)."""
        for _ in range(5):
            assignment = self.consumer.assignment()
            mine = {KafkaTP(tp.topic, tp.partition): off for tp, off in offsets.items()
                    if KafkaTP(tp.topic, tp.partition) in assignment}
            if not mine:
                return
            try:
                await self.consumer.commit(mine)
                return
            except (CommitFailedError, IllegalStateError):
                self.changed.clear()
                await self.changed.wait()
        raise FatalError(f"kafka: group {self.group!r} kept rebalancing; offsets not committed")

    async def committed(self, tp: TopicPartition) -> int | None:
        return await self.consumer.committed(KafkaTP(tp.topic, tp.partition))

    async def close(self) -> None:
        """Leave the group at once (others take over without waiting for a timeout)."""
        for task in [*self._releases, *([self._keepalive] if self._keepalive else [])]:
            task.cancel()
        if self._asking is not None:
            self._asking.cancel()
        if len(self.view.members) > 1:  # (alone: no follower's SyncGroup to wait for)
            await asyncio.sleep(max(0.0, self.settled_at - asyncio.get_running_loop().time()))
        try:
            await self.consumer.stop()
        except Exception:
            log.debug("closing a Kafka group member failed", exc_info=True)


def _ours(partitions: set[TP]) -> list[TopicPartition]:
    return [TopicPartition(t, p) for t, p in sorted(partitions)]
