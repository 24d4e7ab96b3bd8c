"""Label and field selectors, in the syntax of k8s.io/apimachinery `labels.Parse`/`fields.Parse`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Match = Callable[[dict[str, Any]], bool]
_SET_TERM = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split(text: str) -> list[str]:
    """Commas outside parentheses separate terms."""
    terms, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [t.strip() for t in terms if t.strip()]


def _label_term(term: str) -> tuple[str, str, frozenset[str]]:
    found = _SET_TERM.match(term)
    if found:
        values = frozenset(v.strip() for v in found.group(3).split(",") if v.strip())
        return found.group(1), found.group(2), values
    if "!=" in term:
        key, val = term.split("!=", 1)
        return key.strip(), "!=", frozenset([val.strip()])
    if "=" in term:
        key, val = term.replace("==", "=").split("=", 1)
        return key.strip(), "=", frozenset([val.strip()])
    if term.startswith("!"):
        return term[1:].strip(), "!exists", frozenset()
    return term, "exists", frozenset()


def _label_ok(labels: dict[str, str], key: str, op: str, values: frozenset[str]) -> bool:
    if op == "exists":
        return key in labels
    if op == "!exists":
        return key not in labels
    if op in ("=", "in"):
        return labels.get(key) in values
    return labels.get(key) not in values  # "!=", "notin": an absent label matches


def label_selector(text: str | None) -> Match:
    terms = [_label_term(t) for t in _split(text or "")]

    def match(obj: dict[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(_label_ok(labels, *term) for term in terms)

    return match


def _field(obj: Any, path: str) -> str:
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    if obj is None:
        return ""
    if isinstance(obj, bool):
        return "true" if obj else "false"
    return str(obj)


def _field_term(term: str) -> tuple[str, bool, str]:
    if "!=" in term:
        path, val = term.split("!=", 1)
        return path.strip(), False, val.strip()
    path, val = term.replace("==", "=").split("=", 1)
    return path.strip(), True, val.strip()


def field_selector(text: str | None) -> Match:
    terms = [_field_term(t) for t in _split(text or "")]
    return lambda obj: all((_field(obj, p) == v) == equal for p, equal, v in terms)
