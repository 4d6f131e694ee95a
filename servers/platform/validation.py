"""The request rules declared in the protos, enforced with protovalidate.

Every field constraint a request must meet without looking anything up
(lengths, ranges, formats, required fields, repeated sizes, CEL rules across
fields) is declared in ``protos/`` with ``buf.validate`` annotations, so every
language's client sees the same contract. The platform middleware checks each
request message here before its handler runs and answers INVALID_ARGUMENT with
one ``google.rpc.BadRequest`` field violation per broken rule, the field path in
proto field names (``hello.device_id``, ``member_usernames[0]``). Handlers keep
only the rules that need state: an unknown user, a taken alias, a checksum
over the bytes received.
"""

from __future__ import annotations

from typing import Any

import protovalidate
from google.protobuf.message import Message

from servers.platform.errors import InvalidArgument

_validator = protovalidate.Validator()


def _path(field: Any) -> str:
    """A buf.validate.FieldPath as proto field names: ``a.b[0].c``, ``labels["k"]``."""
    out = ""
    for el in field.elements:
        out = f"{out}.{el.field_name}" if out else el.field_name
        sub = el.subscript  # the index or map key of a repeated or map element, or None
        if sub is None:
            continue
        if sub.field == "string_key":
            out += f'["{sub.value}"]'
        elif sub.field == "bool_key":
            out += f"[{str(sub.value).lower()}]"
        else:
            out += f"[{sub.value}]"
    return out


def violations(message: Message, prefix: str = "") -> list[tuple[str, str]]:
    """(field path, description) for every rule ``message`` breaks; [] when it is valid."""
    out = []
    for v in _validator.collect_violations(message):
        pb = v.proto
        path = _path(pb.field) if pb.field is not None else ""
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        out.append((path or "request", pb.message or pb.rule_id))
    return out


def check(message: Message, prefix: str = "") -> None:
    """Raise InvalidArgument with every rule ``message`` breaks."""
    found = violations(message, prefix)
    if found:
        raise InvalidArgument(found)
