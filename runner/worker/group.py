"""The tasks of a pipeline (its source tasks; its processors), run here or shared among
its processes (Kafka)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

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


class WorkerGroup:
    """Runs the pipeline's source tasks (`role` "source-tasks"), or its processors
    ("processors"): each must run in one process at a time.

    On one machine (embedded broker) this process runs all of them. On Kafka, the
    processes of a pipeline share them as Kafka Connect's workers do, through Kafka
    itself: a control topic with one partition per task, and a consumer group on it
    (`_pipeline-<pipeline>-<role>`). Each process runs the tasks whose partitions it is
    assigned. When a process joins or leaves, the group rebalances: a task to be given up
    stops polling, writes and commits what it polled, and closes before the partition
    goes to another process, which starts the task again from its offsets (a processor:
    and its state). A process killed outright loses its tasks when its session times out.
    """

    def __init__(self, pipeline: str, role: str, slots: list[TaskSlot], broker: Broker, stop: asyncio.Event,
                 once: bool) -> None:
        self.pipeline = pipeline
        self.role = role
        self.slots = slots
        self.broker = broker
        self.stop = stop
        self.once = once  # return when the tasks running here have ended
        self.running: dict[int, tuple[asyncio.Event, asyncio.Task]] = {}
        self.changed = asyncio.Event()

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
        consumer = await self.broker.consumer(topic, [topic])
        try:
            consumer.on_rebalance(self._revoked, self._assigned)
            await self._assigned(await consumer.assignment())
            while not self.stop.is_set():
                tasks = [task for _, task in self.running.values()]
                for task in tasks:
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        raise task.exception()
                if self.once and all(task.done() for task in tasks):
                    break
                self.changed.clear()
                waits = {asyncio.ensure_future(self.stop.wait()), asyncio.ensure_future(self.changed.wait())}
                pending = [task for task in tasks if not task.done()]
                _done, _rest = await asyncio.wait(waits | set(pending), return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
        finally:
            consumer.on_rebalance(None, None)
            await self._stop(list(self.running))
            await consumer.close()

    async def _assigned(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            if tp.partition not in self.running:
                slot = self.slots[tp.partition]
                stop = asyncio.Event()
                self.running[tp.partition] = (stop, asyncio.create_task(slot.runner(stop).run()))
                log.info("%s: task %d started here", slot.source, slot.index)
        self.changed.set()

    async def _revoked(self, partitions: list[TopicPartition]) -> None:
        await self._stop([tp.partition for tp in partitions])
        self.changed.set()

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
