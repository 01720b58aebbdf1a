"""The settings of a Kafka cluster, as the spec gives them (`broker: {kafka: ...}`, a kafka
connector's `cluster:`). Light to import: aiokafka itself loads only when a client is made,
so commands that never talk to Kafka start without it."""

from __future__ import annotations

from typing import Any, Literal

from runner.config import Config, ConfigError, setting


class SecurityOptions(Config):
    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = setting(
        "PLAINTEXT", help="How clients talk to the brokers."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = setting(
        None, help="SASL mechanism (SASL_* protocols)."
    )
    username: str | None = setting(None, help="SASL user name.")
    password: str | None = setting(None, help="SASL password; write it as ${ENV_VAR}.", secret=True)
    ssl_cafile: str | None = setting(None, help="CA bundle to verify the brokers (SSL protocols).")
    ssl_certfile: str | None = setting(None, help="Client certificate (mutual TLS).")
    ssl_keyfile: str | None = setting(None, help="Client certificate's key (mutual TLS).")
    ssl_check_hostname: bool = setting(True, help="Check the brokers' host names against their certificates.")


class KafkaOptions(Config):
    bootstrap_servers: str = setting(help="Comma-separated host:port of some brokers of the cluster.")
    client_id: str = setting("pipeline", help="Client id shown in the brokers' logs and metrics.")
    security: dict[str, Any] = setting({}, help="TLS and SASL settings (see SecurityOptions).")
    producer: dict[str, Any] = setting({}, help="Extra AIOKafkaProducer settings (linger_ms, compression_type, ...).")
    consumer: dict[str, Any] = setting({}, help="Extra AIOKafkaConsumer settings (session_timeout_ms, ...).")
    replication_factor: int = setting(1, help="Replication factor of the topics pipeline creates.", min=1, max=100)
    offsets_topic: str = setting("_pipeline_offsets", help="Compacted topic holding the source offsets.")
    request_timeout_ms: int = setting(30_000, help="How long a request may wait for the cluster.", min=100)

    @classmethod
    def check(cls, given: dict[str, Any]) -> list[tuple[str, str]]:
        security = given.get("security")
        if not isinstance(security, dict):
            return []
        try:
            checked = SecurityOptions.parse(security)
        except ConfigError as exc:
            return [(f"security.{k}" if k else "security", m) for k, m in exc.problems]
        if checked.protocol.startswith("SASL_") and not (checked.sasl_mechanism and checked.username and checked.password):
            return [("security", f"{checked.protocol} needs sasl_mechanism, username and password")]
        return []

    def security_options(self) -> SecurityOptions:
        return SecurityOptions.parse(self.security)


def client_settings(options: KafkaOptions) -> dict[str, Any]:
    """The connection settings every aiokafka client of this cluster gets."""
    sec = options.security_options()
    settings: dict[str, Any] = {
        "bootstrap_servers": options.bootstrap_servers,
        "client_id": options.client_id,
        "security_protocol": sec.protocol,
        "request_timeout_ms": options.request_timeout_ms,
    }
    if sec.protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context  # only a client needs aiokafka

        context = create_ssl_context(cafile=sec.ssl_cafile, certfile=sec.ssl_certfile, keyfile=sec.ssl_keyfile)
        context.check_hostname = sec.ssl_check_hostname
        settings["ssl_context"] = context
    if sec.protocol.startswith("SASL_"):
        settings.update(
            sasl_mechanism=sec.sasl_mechanism,
            sasl_plain_username=sec.username,
            sasl_plain_password=sec.password,
        )
    return settings
