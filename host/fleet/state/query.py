"""Live queries: a small filter language, parsed here into the compact form
the boards evaluate (firmware/query.py), and the scatter-gather itself.

    board == pico_w and temp > 40
    not (rssi < -80 or backlog > 0)
    id in [sim-001, sim-002] and firmware != "0.0.9"

Grammar (precedence low to high: or, and, not):

    expr     := or
    or       := and ("or" and)*
    and      := unary ("and" unary)*
    unary    := "not" unary | "(" expr ")" | compare
    compare  := FIELD OP value | FIELD "in" "[" value ("," value)* "]"
    OP       := == != < <= > >=
    value    := number | "quoted string" | true | false | bare-word

The left side is always a field of the board's info (protocol.json
"query_fields", with aliases such as temp for temp_c); a bare word on the
right is a string. Errors point at the position.

The question goes to every connected board on fleet/query (a plain NATS
publish reaches the MQTT subscribers); every board answers on
fleet/<id>/answer, matching or not, so the asker knows when all online
boards have been heard.
"""
from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from fleet.errors import UsageError
from fleet.state.inventory import registry_records
from fleet.protocol import nats_subject, protocol, topic_root

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<number>-?\d+(?:\.\d+)?)(?![\w.-]) |
        (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*') |
        (?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,) |
        (?P<word>[A-Za-z0-9_][A-Za-z0-9_.-]*)
    )""",
    re.VERBOSE,
)
_COMPARE = ("==", "!=", "<", "<=", ">", ">=")
MAX_LENGTH = 512


class QueryError(UsageError):
    """An invalid filter: the message names what was expected and shows where."""

    def __init__(self, text: str, position: int, message: str) -> None:
        self.position = position
        super().__init__(f"{message} at position {position + 1}:\n  {text}\n  {' ' * position}^")


@dataclass(frozen=True)
class _Token:
    kind: str  # number, string, op, word, end
    text: str
    position: int


def query_fields() -> dict[str, str]:
    return dict(protocol()["query_fields"])


def _aliases() -> dict[str, str]:
    return dict(protocol()["query_aliases"])


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            start = position + (len(text[position:]) - len(text[position:].lstrip()))
            raise QueryError(text, start, f"unexpected {text[start]!r}")
        kind = match.lastgroup or "word"
        start = match.start(kind)
        tokens.append(_Token(kind, match.group(kind), start))
        position = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.at = 0

    @property
    def token(self) -> _Token:
        return self.tokens[self.at]

    def fail(self, message: str, token: _Token | None = None) -> QueryError:
        token = token or self.token
        found = "the end" if token.kind == "end" else repr(token.text)
        return QueryError(self.text, token.position, f"{message}, found {found}")

    def take(self) -> _Token:
        token = self.token
        self.at += 1
        return token

    def is_word(self, word: str) -> bool:
        return self.token.kind == "word" and self.token.text.lower() == word

    def parse(self) -> list[Any]:
        node = self.parse_or()
        if self.token.kind != "end":
            raise self.fail("expected 'and', 'or' or the end")
        return node

    def parse_or(self) -> list[Any]:
        node = self.parse_and()
        while self.is_word("or"):
            self.take()
            node = ["or", node, self.parse_and()]
        return node

    def parse_and(self) -> list[Any]:
        node = self.parse_unary()
        while self.is_word("and"):
            self.take()
            node = ["and", node, self.parse_unary()]
        return node

    def parse_unary(self) -> list[Any]:
        if self.is_word("not"):
            self.take()
            return ["not", self.parse_unary()]
        if self.token.text == "(" and self.token.kind == "op":
            self.take()
            node = self.parse_or()
            if self.token.text != ")":
                raise self.fail("expected ')'")
            self.take()
            return node
        return self.parse_compare()

    def parse_compare(self) -> list[Any]:
        token = self.token
        if token.kind != "word" or token.text.lower() in ("and", "or", "not", "in"):
            raise self.fail("expected a field name")
        name = _aliases().get(token.text, token.text)
        if name not in query_fields():
            raise QueryError(
                self.text, token.position, f"unknown field {token.text!r} (fields: {', '.join(sorted(query_fields()))})"
            )
        self.take()
        if self.is_word("in"):
            self.take()
            if self.token.text != "[":
                raise self.fail("expected '[' after 'in'")
            self.take()
            values = [self.parse_value()]
            while self.token.text == ",":
                self.take()
                values.append(self.parse_value())
            if self.token.text != "]":
                raise self.fail("expected ',' or ']'")
            self.take()
            return ["in", name, values]
        if self.token.kind != "op" or self.token.text not in _COMPARE:
            raise self.fail("expected one of == != < <= > >= in")
        op = self.take().text
        return [op, name, self.parse_value()]

    def parse_value(self) -> Any:
        token = self.token
        if token.kind == "number":
            self.take()
            return float(token.text) if "." in token.text else int(token.text)
        if token.kind == "string":
            self.take()
            return json.loads('"' + token.text[1:-1].replace('"', '\\"') + '"') if token.text[0] == "'" else json.loads(token.text)
        if token.kind == "word" and token.text.lower() not in ("and", "or", "not", "in"):
            self.take()
            lowered = token.text.lower()
            return True if lowered == "true" else False if lowered == "false" else token.text
        raise self.fail("expected a value (a number, a \"string\", a word, true or false)")


def parse_filter(text: str) -> list[Any] | None:
    """The compact form of a filter; None for an empty one (every board)."""
    if len(text) > MAX_LENGTH:
        raise QueryError(text[:40] + "...", 40, f"filters are at most {MAX_LENGTH} characters")
    if not text.strip():
        return None
    return _Parser(text).parse()


def check_fields(names: list[str]) -> list[str]:
    known = query_fields()
    resolved = [_aliases().get(name, name) for name in names]
    unknown = [name for name, full in zip(names, resolved) if full not in known]
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(known))})")
    return resolved


@dataclass
class QueryOutcome:
    matches: list[dict[str, Any]] = field(default_factory=list)  # {"id": ..., "fields": {...}}
    answered: set[str] = field(default_factory=set)
    online: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        return sorted(self.online - self.answered)


async def online_devices(nc: Client) -> set[str]:
    """Devices the registry says are online now."""
    return {record.id for record in await registry_records(nc.jetstream()) if record.online}


async def scatter(
    nc: Client,
    where: list[Any] | None,
    fields: list[str] | None,
    timeout: float,
    on_match: Callable[[dict[str, Any]], Any] | None = None,
) -> QueryOutcome:
    """Ask every connected board; return when all online ones answered or at the timeout."""
    outcome = QueryOutcome(online=await online_devices(nc))
    query_id = uuid.uuid4().hex[:12]
    everyone = asyncio.Event()

    async def collect(message: Msg) -> None:
        try:
            answer = json.loads(message.data)
        except ValueError:
            return
        if not isinstance(answer, dict) or answer.get("q") != query_id:
            return  # someone else's question
        device = message.subject.split(".")[1]
        if device in outcome.answered:
            return
        outcome.answered.add(device)
        if "error" in answer:
            outcome.errors[device] = str(answer["error"])
        elif answer.get("match"):
            found = {"id": device, "fields": answer.get("fields") or {}}
            outcome.matches.append(found)
            if on_match is not None:
                result = on_match(found)
                if asyncio.iscoroutine(result):
                    await result
        if outcome.online and outcome.online <= outcome.answered:
            everyone.set()

    subscription = await nc.subscribe(nats_subject("*", "answer"), cb=collect)
    try:
        await nc.flush()
        question = {"q": query_id, "where": where, "fields": fields}
        await nc.publish(f"{topic_root()}.query", json.dumps(question).encode())
        try:
            await asyncio.wait_for(everyone.wait(), timeout)
        except asyncio.TimeoutError:
            pass
    finally:
        await subscription.unsubscribe()
    return outcome


__all__ = ["QueryError", "QueryOutcome", "check_fields", "online_devices", "parse_filter", "query_fields", "scatter"]
