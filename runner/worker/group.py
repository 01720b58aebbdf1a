"""The tasks of a pipeline (its source tasks; its processors), run here or shared among
its processes (Kafka)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runner.broker.base import Broker, TopicPartition
from runner.errors import FatalError
from runner.worker.common import log
from runner.worker.processor import ProcessorRunner
from runner.worker.scheduled import ScheduledRunner
from runner.worker.source import SourceRunner


@dataclass
class TaskSlot:
    """Task number `index` of a source (or a processor: index 0) in the spec; `runner(stop)`
    builds a fresh runner of it (a task stopped in a rebalance is not reused: a new one
    resumes from offsets)."""

    source: str  # the source's or processor's name
    index: int
    runner: Callable[[asyncio.Event], SourceRunner | ScheduledRunner | ProcessorRunner]
    # (--once) set when the task has ended, here or (Kafka) in whichever process ran it:
    # what reads its output waits for it.
    ended: asyncio.Event | None = None


class WorkerGroup:
    """Runs the pipeline's source tasks (`role` "source-tasks"), or its processors
    ("processors"): each must run in one process at a time.

    On one machine (embedded broker) this process runs all of them. On Kafka, the
    processes of a pipeline share them as Kafka Connect's workers do, through Kafka
    itself: a control topic with one partition per task, and a consumer group on it
    (`_pipeline-<pipeline>-<role>`) whose rebalances are incremental and sticky
    (`runner.broker.kafka_groups`). Each process runs the tasks whose partitions it holds.
    When a process joins or leaves, only the tasks that change hands move: a task to be
    given up stops polling, writes and commits what it polled, and closes before its
    partition goes to another process, which starts it again from its offsets (a
    processor: and its state); the other tasks run on. A process that ends leaves the
    group at once; one killed outright loses its tasks when its session times out.

    A process that finds the group empty (it starts the pipeline, alone or with others at
    once) has its source tasks read ahead while it waits out the first round
    (`SourceRunner.read_ahead`); the tasks it is then given go on from there, the others
    are closed.

    With `once`, `run` returns when every task of the group has ended, wherever it ran:
    a process tells the group which tasks it saw end (its member note, read at each
    rebalance, and it asks for one when a task of its own ends), and a task the group
    knows ended is not started again.
    """

    def __init__(self, pipeline: str, role: str, slots: list[TaskSlot], broker: Broker, stop: asyncio.Event,
                 once: bool) -> None:
        self.pipeline = pipeline
        self.role = role
        self.slots = slots
        self.broker = broker
        self.stop = stop
        self.once = once
        self.running: dict[int, tuple[asyncio.Event, asyncio.Task]] = {}
        self.done: set[int] = set()  # tasks known to have ended (--once): here, or told by the group
        self.member: Any = None  # (Kafka) this process in the group, once `run` joined it
        self.ahead: dict[int, tuple[asyncio.Event, SourceRunner]] = {}  # tasks reading ahead
        self.dropped: list[asyncio.Task] = []  # closing the tasks that read ahead in vain

    @property
    def control_topic(self) -> str:
        return f"_pipeline-{self.pipeline}-{self.role}"

    async def run(self) -> None:
        if not self.slots:
            return
        if not self.broker.distributed:
            async with asyncio.TaskGroup() as group:
                for slot in self.slots:
                    group.create_task(slot.runner(self.stop).run())
            return
        topic = self.control_topic
        try:
            await self.broker.ensure_topic(topic, len(self.slots))
        except FatalError as exc:
            raise FatalError(
                f"pipeline {self.pipeline!r} has {len(self.slots)} {self.role.replace('-', ' ')}, but its "
                f"control topic {topic!r} was made for another number ({exc})",
                hint=f"stop every process of the pipeline, delete the topic {topic!r}, and start again",
            ) from None
        self.member = member = self.broker.membership(topic, [topic], self._note)
        member.release_cb, member.assigned_cb, member.lost_cb = self._release, self._assigned, self._release
        try:
            if await self.broker.group_is_empty(topic):
                self._read_ahead()
            await member.start()
            while not self.stop.is_set():
                self._check(member)
                # Ended when the group says so: every process learns it in the same
                # rebalance, and none starts again a task another saw end. (Alone in the
                # group, what ended here is all there is to know.)
                alone = len(member.view.members) <= 1
                if self.once and len(set(member.view.done) if not alone else self.done) == len(self.slots):
                    break
                member.changed.clear()
                waits = {asyncio.ensure_future(self.stop.wait()), asyncio.ensure_future(member.changed.wait())}
                pending = [task for _, task in self.running.values() if not task.done()]
                await asyncio.wait(waits | set(pending), return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
        finally:
            member.release_cb = member.assigned_cb = member.lost_cb = None
            self._drop_ahead()
            await self._stop(list(self.running))
            await member.close()
            await asyncio.gather(*self.dropped)

    def _read_ahead(self) -> None:
        for i, slot in enumerate(self.slots):
            stop = asyncio.Event()
            runner = slot.runner(stop)
            if isinstance(runner, SourceRunner) and runner.can_read_ahead:
                runner.read_ahead()
                self.ahead[i] = (stop, runner)

    def _drop_ahead(self) -> None:
        for _, runner in self.ahead.values():
            self.dropped.append(asyncio.create_task(runner.discard()))
        self.ahead.clear()

    def _note(self) -> dict:
        return {"done": sorted(self.done)} if self.once else {}

    def _check(self, member: Any) -> None:
        """Raise what failed; note the tasks that ended here (and tell the group)."""
        if member.failure is not None:
            raise member.failure
        ended = False
        for i, (stop, task) in list(self.running.items()):
            if not task.done():
                continue
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
            # A task stopped here (given up in a rebalance) has not ended: its next owner
            # goes on with it.
            if self.once and i not in self.done and not stop.is_set():
                self.done.add(i)
                ended = True
                log.info("%s: task %d ended here", self.slots[i].source, self.slots[i].index)
        if self.once:
            self.done |= set(member.view.done)
            self._tell_ended()
        if ended and len(member.view.members) > 1:  # (alone: nobody to tell)
            member.rejoin()

    def _tell_ended(self) -> None:
        for i in self.done:
            if self.slots[i].ended is not None:
                self.slots[i].ended.set()

    async def _assigned(self, partitions: list[TopicPartition]) -> None:
        if self.once and self.member is not None:
            self.done |= set(self.member.view.done)
            self._tell_ended()
        for tp in partitions:
            if tp.partition not in self.running and tp.partition not in self.done:
                slot = self.slots[tp.partition]
                stop, runner = self.ahead.pop(tp.partition, None) or self._fresh(slot)
                self.running[tp.partition] = (stop, asyncio.create_task(runner.run()))
                log.info("%s: task %d started here", slot.source, slot.index)
        self._drop_ahead()  # the first round is over: the others run elsewhere
        if self.member is not None:
            self._log_assignment()

    @staticmethod
    def _fresh(slot: TaskSlot) -> tuple[asyncio.Event, Any]:
        stop = asyncio.Event()
        return stop, slot.runner(stop)

    def _log_assignment(self) -> None:
        """Who runs what, as the group's last rebalance shared it out."""
        def named(assigned: list) -> str:
            tasks = [f"{self.slots[p].source}/{self.slots[p].index}" for _, p in assigned if p < len(self.slots)]
            return ", ".join(tasks) or "nothing"

        log.info("%s: %s", self.role, "; ".join(f"{m['name']} runs {named(m['assigned'])}"
                                                 for m in self.member.view.members))

    async def _release(self, partitions: list[TopicPartition]) -> None:
        await self._stop([tp.partition for tp in partitions])

    async def _stop(self, indexes: list[int]) -> None:
        """Stop these tasks and wait for them: their last batches are written first. A
        task that failed keeps its place, so `run` reports the failure."""
        stopping = [(i, self.running[i]) for i in indexes if i in self.running]
        for _, (stop, _) in stopping:
            stop.set()
        for i, (_, task) in stopping:
            await asyncio.wait([task])
            # Another _stop (a revocation during the run's own shutdown) may have stopped it
            # meanwhile: the one that finds it still in place removes it and logs.
            if (task.cancelled() or task.exception() is None) and self.running.get(i, (None, None))[1] is task:
                del self.running[i]
                log.info("%s: task %d stopped here", self.slots[i].source, self.slots[i].index)
