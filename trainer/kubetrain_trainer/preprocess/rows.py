"""One input row → a validated document, or a reason why not; and the tally of both.

Every row ends in exactly one bucket: accepted, or rejected with one of :data:`REASONS`. The checks
here run in the worker processes, next to the tokenizer; they are pure functions of the row.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from kubetrain_trainer.config import Fields

#: Reasons a row is rejected, in the order they are checked and reported.
INVALID_UTF8 = "invalidUtf8"
INVALID_JSON = "invalidJson"
WRONG_TYPE = "wrongType"
MISSING_FIELD = "missingField"
EMPTY_TEXT = "emptyText"
BAD_ROLES = "badRoles"
TOO_LONG = "tooLong"
REASONS = (INVALID_UTF8, INVALID_JSON, WRONG_TYPE, MISSING_FIELD, EMPTY_TEXT, BAD_ROLES, TOO_LONG)
#: Offending `file:line`s kept per reason (manifest; the result JSON keeps fewer).
FIRST_PER_REASON = 10

RecordKind = Literal["json", "text", "value"]
Message = dict[str, str]
Preference = tuple[list[Message], str, str]


@dataclass(frozen=True)
class Reject:
    """Why a row was refused (one of REASONS)."""

    reason: str


@dataclass
class Tally:
    """Rows read, accepted and rejected by reason, with the first offending locations."""

    rows: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    first: dict[str, list[str]] = field(default_factory=dict)

    def accept(self) -> None:
        self.rows += 1
        self.accepted += 1

    def reject(self, reason: str, where: str) -> None:
        self.rows += 1
        self.rejected[reason] += 1
        seen = self.first.setdefault(reason, [])
        if len(seen) < FIRST_PER_REASON:
            seen.append(where)

    def unaccept(self, reason: str, where: str) -> None:
        """A row accepted by the checks but refused after tokenization (too long)."""
        self.rows -= 1
        self.accepted -= 1
        self.reject(reason, where)

    def merge(self, other: Tally) -> None:
        """Add a later chunk's tally; first locations stay in input order."""
        self.rows += other.rows
        self.accepted += other.accepted
        self.rejected.update(other.rejected)
        for reason, where in other.first.items():
            seen = self.first.setdefault(reason, [])
            seen.extend(where[: FIRST_PER_REASON - len(seen)])

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def as_dict(self, first: int = FIRST_PER_REASON) -> dict[str, Any]:
        order = [r for r in REASONS if self.rejected[r]]
        return {
            "rowsRead": self.rows,
            "accepted": self.accepted,
            "rejected": {r: self.rejected[r] for r in order},
            "firstRejected": {r: self.first[r][:first] for r in order},
        }


def parse(record: bytes | object | None, kind: RecordKind) -> object | Reject:
    """Decode a raw record: JSON Lines bytes, a text document's bytes, or a parsed value."""
    if record is None:  # the reader cut a line longer than MAX_RECORD_BYTES
        return Reject(TOO_LONG)
    if kind == "value":
        return record
    assert isinstance(record, bytes)
    try:
        text = record.decode("utf-8")
    except UnicodeDecodeError:
        return Reject(INVALID_UTF8)
    if kind == "text":
        return text
    try:
        value: object = json.loads(text)
    except json.JSONDecodeError:
        return Reject(INVALID_JSON)
    return value


def _field(value: object, name: str) -> object | Reject:
    if not isinstance(value, dict):
        return Reject(WRONG_TYPE)
    found = value.get(name)
    return Reject(MISSING_FIELD) if found is None else found


def text_document(value: object, fields: Fields | None) -> str | Reject:
    """A document of format text: the text field of a row, or (fields None) a .txt record."""
    text = value if fields is None else _field(value, fields.text)
    if isinstance(text, Reject):
        return text
    if not isinstance(text, str):
        return Reject(WRONG_TYPE)
    return text if text.strip() else Reject(EMPTY_TEXT)


def _messages(value: object) -> list[Message] | Reject:
    if not isinstance(value, list):
        return Reject(WRONG_TYPE)
    if not value:
        return Reject(EMPTY_TEXT)
    messages = []
    for item in value:
        if not isinstance(item, dict):
            return Reject(WRONG_TYPE)
        role, content = item.get("role"), item.get("content")
        if role is None or content is None:
            return Reject(MISSING_FIELD)
        if not isinstance(role, str) or not isinstance(content, str):
            return Reject(WRONG_TYPE)
        messages.append({"role": role, "content": content})
    return messages


def _turns_ok(roles: list[str], last: str) -> bool:
    """An optional leading system turn, then user/assistant alternating, ending with `last`."""
    turns = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    return bool(turns) and turns == expected[: len(turns)] and turns[-1] == last


def chat_messages(value: object, fields: Fields) -> list[Message] | Reject:
    """A conversation of format chat: ends with an assistant turn, roles alternate."""
    found = _field(value, fields.messages)
    messages = found if isinstance(found, Reject) else _messages(found)
    if isinstance(messages, Reject):
        return messages
    if not _turns_ok([m["role"] for m in messages], "assistant"):
        return Reject(BAD_ROLES)
    if any(not m["content"].strip() for m in messages):
        return Reject(EMPTY_TEXT)
    return messages


def _answer(value: object) -> str | Reject:
    """A completion: a string, or a one-message list with the assistant turn (TRL's style)."""
    if isinstance(value, list):
        messages = _messages(value)
        if isinstance(messages, Reject):
            return messages
        if [m["role"] for m in messages] != ["assistant"]:
            return Reject(BAD_ROLES)
        value = messages[0]["content"]
    if not isinstance(value, str):
        return Reject(WRONG_TYPE)
    return value if value.strip() else Reject(EMPTY_TEXT)


def preference_pair(value: object, fields: Fields) -> Preference | Reject:
    """prompt (a string or messages ending with a user turn), chosen and rejected answers."""
    parts = [_field(value, name) for name in (fields.prompt, fields.chosen, fields.rejected)]
    for part in parts:
        if isinstance(part, Reject):
            return part
    prompt_value, chosen_value, rejected_value = parts
    if isinstance(prompt_value, str):
        prompt: list[Message] | Reject = (
            [{"role": "user", "content": prompt_value}]
            if prompt_value.strip()
            else Reject(EMPTY_TEXT)
        )
    else:
        prompt = _messages(prompt_value)
        if not isinstance(prompt, Reject):
            if not _turns_ok([m["role"] for m in prompt], "user"):
                prompt = Reject(BAD_ROLES)
            elif any(not m["content"].strip() for m in prompt):
                prompt = Reject(EMPTY_TEXT)
    if isinstance(prompt, Reject):
        return prompt
    chosen, rejected = _answer(chosen_value), _answer(rejected_value)
    if isinstance(chosen, Reject):
        return chosen
    if isinstance(rejected, Reject):
        return rejected
    return prompt, chosen, rejected
