"""`useragent`: a transform that enriches records from their User-Agent header with the
browser, its version, the operating system, the device and whether it is a bot, using
`ua-parser` (the uap-core regexes, https://github.com/ua-parser/uap-core).

    transforms:
      - useragent: {}                              # reads `user_agent`
      - useragent: {field: ua, prefix: "ua_"}      # adds ua_browser, ua_os, ...

Added fields (nullable strings, and a boolean):

- `browser`: the browser or client family ("Chrome", "Mobile Safari", "Googlebot", "curl")
- `browser_version`: its version as ua-parser reads it ("126.0.0.0", "17.5")
- `os`: the operating system family ("Windows", "iOS", "Mac OS X", "Android")
- `device`: the device family ("iPhone", "Pixel 8", "Mac", "Spider" for bots)
- `is_bot`: true when ua-parser's device family is "Spider" (crawlers, monitors)

What ua-parser does not recognise is null, never "Other"; a null or empty user agent gives
null fields and `is_bot` false. Fields of these names already in a record are overwritten
(`schema()` replaces them likewise); a user agent that is not a string is a data error. Each distinct user agent of a batch is parsed once (access
logs hold few distinct ones; ua-parser also keeps a cache across batches).
"""

from __future__ import annotations

from typing import Any

from ua_parser import parse

from runner.transform import Batch, Config, Transform, hookimpl, setting

__all__ = ["UserAgent", "register_transforms"]

# name -> Avro type of each field the transform adds (before the prefix).
_ADDED: dict[str, Any] = {
    "browser": ["null", "string"],
    "browser_version": ["null", "string"],
    "os": ["null", "string"],
    "device": ["null", "string"],
    "is_bot": "boolean",
}
_DOCS = {
    "browser": "Browser or client family, from the user agent (ua-parser); null if unknown",
    "browser_version": "Browser version, from the user agent (ua-parser); null if unknown",
    "os": "Operating system family, from the user agent (ua-parser); null if unknown",
    "device": "Device family, from the user agent (ua-parser); null if unknown",
    "is_bot": "True when the user agent is a crawler or bot (ua-parser device family Spider)",
}


_NOT_A_STRING: dict[str, Any] = {}


def parse_user_agent(ua: str | None) -> dict[str, Any]:
    """The added fields (without prefix) for one user-agent string."""
    if not ua:
        return {"browser": None, "browser_version": None, "os": None, "device": None, "is_bot": False}
    result = parse(ua)
    agent, os_, device = result.user_agent, result.os, result.device
    version = None
    if agent is not None:
        parts = []
        for part in (agent.major, agent.minor, agent.patch, agent.patch_minor):
            if part is None:
                break
            parts.append(part)
        version = ".".join(parts) or None
    return {
        "browser": agent.family if agent is not None else None,
        "browser_version": version,
        "os": os_.family if os_ is not None else None,
        "device": device.family if device is not None else None,
        "is_bot": device is not None and device.family == "Spider",
    }


class UserAgent(Transform):
    name = "useragent"
    description = "Adds browser, browser_version, os, device and is_bot parsed from a user-agent field (ua-parser)."

    class Config(Config):
        field: str = setting("user_agent", help="The field holding the User-Agent header (a string or null).")
        prefix: str = setting("", help='Prepended to the names of the added fields (e.g. "ua_").')

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self.names = {name: config.prefix + name for name in _ADDED}

    def apply(self, batch: Batch) -> Batch:
        if not len(batch):
            return batch
        field, names = self.config.field, self.names
        seen: dict[Any, dict[str, Any]] = {}  # this batch's distinct user agents
        rows: list[dict[str, Any]] = []
        kept: list[int] = []
        errors = []
        for index, row in enumerate(batch.rows):
            ua = row.get(field)
            added = seen.get(ua) if ua is None or isinstance(ua, str) else _NOT_A_STRING
            if added is _NOT_A_STRING:
                errors.append(self.record_error(
                    batch, index, f"field {field!r} should be a string, got {type(ua).__name__}", field=field))
                continue
            if added is None:
                parsed = parse_user_agent(ua)
                added = seen[ua] = {names[k]: v for k, v in parsed.items()}
            rows.append({**row, **added})
            kept.append(index)
        if errors:
            return batch.derive(rows, kept=kept, errors=errors)
        return batch.derive(rows)

    def schema(self, schema: dict) -> dict:
        field = self.config.field
        fields = schema.get("fields", [])
        names = {f["name"] for f in fields}
        if field not in names:
            raise ValueError(
                f"useragent: the schema has no field {field!r} to read the user agent from "
                f"(fields: {', '.join(sorted(names)) or 'none'}); set `field:`"
            )
        declared = next(f["type"] for f in fields if f["name"] == field)
        branches = declared if isinstance(declared, list) else [declared]
        if not any(b == "string" or (isinstance(b, dict) and b.get("type") == "string") for b in branches):
            raise ValueError(f"useragent: field {field!r} is {declared!r}, not a string")
        added = {
            self.names[name]: {"name": self.names[name], "type": kind, "default": False if kind == "boolean" else None,
                               "doc": _DOCS[name]}
            for name, kind in _ADDED.items()
        }
        # A field of the same name is replaced where it stands (apply overwrites its
        # values); the others are appended.
        kept = [added.pop(f["name"]) if f["name"] in added else f for f in fields]
        return {**schema, "fields": [*kept, *added.values()]}


@hookimpl
def register_transforms(register):
    register(UserAgent)
