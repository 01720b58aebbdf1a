"""Stream processing: topics into topics (windows, aggregates), a batch at a time."""
