"""Brokers: the log of topics the worker produces to and consumes from.

- `runner.broker.base`: the interface (`Broker`, `Consumer`) and its data classes.
- `runner.broker.embedded`: durable topics in SQLite in the state directory (default).
- `runner.broker.partitioner`: Kafka's default partitioner (murmur2), used by both.
"""
