"""pipeline: a Kafka Connect-style pipeline runner. The engine lives here; connectors
import only `runner.connector` and `runner.batch`."""

__version__ = "0.1.0"
