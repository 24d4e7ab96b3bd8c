"""What every stage shares: the failures that end it with an exit code, the result summary,
logging set-up. The exit codes themselves are the stage contract (kubetrain_contract.exit_codes).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from kubetrain_contract.exit_codes import EXIT_INVALID, EXIT_RETRY, EXIT_UNHEALTHY

TERMINATION_LOG = Path("/dev/termination-log")
RESULT_LIMIT = 4096  # bytes the kubelet keeps of a termination message


class StageFailure(Exception):
    """Ends the stage with a contract exit code and a message for the user (and the result)."""

    def __init__(self, exit_code: int, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.exit_code, self.message, self.details = exit_code, message, details or {}


class InvalidInput(StageFailure):
    """Bad config or bad data: exit 2, retrying will not help."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(EXIT_INVALID, message, details)


class Unhealthy(StageFailure):
    """The training itself is broken (NaN, divergence, failed sanity gate): exit 3."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(EXIT_UNHEALTHY, message, details)


class Retryable(StageFailure):
    """Trouble that may pass (throttling, 5xx, a full disk): exit 1, retried with backoff."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(EXIT_RETRY, message, details)


def failure(exit_code: int, message: str, details: dict[str, Any] | None = None) -> StageFailure:
    """The failure class of an exit code: a storage error re-raised with the field it concerns
    stays InvalidInput (2) or Retryable (1)."""
    kinds: dict[int, type[InvalidInput | Unhealthy | Retryable]] = {
        EXIT_INVALID: InvalidInput,
        EXIT_UNHEALTHY: Unhealthy,
        EXIT_RETRY: Retryable,
    }
    kind = kinds.get(exit_code)
    return kind(message, details) if kind else StageFailure(exit_code, message, details)


def write_result(stage: str, result: dict[str, Any], workdir: Path) -> Path:
    """Write the summary to <workdir>/result-<stage>.json (whole) and the termination log
    (the kubelet keeps 4 KiB: a shortened summary that is still valid JSON)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"result-{stage}.json"
    path.write_text(_compact(result) + "\n", encoding="utf-8")
    if TERMINATION_LOG.exists() and os.access(TERMINATION_LOG, os.W_OK):
        TERMINATION_LOG.write_text(termination_message(result), encoding="utf-8")
    return path


def termination_message(result: dict[str, Any]) -> str:
    """At most RESULT_LIMIT bytes of JSON: nested details go first, then the error's tail."""
    text = _compact(result)
    if len(text.encode()) <= RESULT_LIMIT:
        return text
    # Nested details go largest first, so small tables (the fit table) survive when they can.
    trimmed: dict[str, Any] = {**result, "truncated": True}
    nested = [k for k, v in result.items() if isinstance(v, dict | list)]
    for key in sorted(nested, key=lambda k: -len(_compact({k: result[k]}))):
        if len(_compact(trimmed).encode()) <= RESULT_LIMIT:
            break
        del trimmed[key]
    error = str(trimmed.pop("error", ""))
    while error not in ("", "…"):
        over = len(_compact({**trimmed, "error": error}).encode()) - RESULT_LIMIT
        if over <= 0:
            return _compact({**trimmed, "error": error})
        body = error.removesuffix("…")
        size = len(json.dumps(body, ensure_ascii=False).encode())  # escapes included
        keep = min(len(body) - 1, len(body) * (size - over - 3) // size)  # "…" takes 3 bytes
        error = body[: max(0, keep)] + "…"
    return _compact(trimmed)


def _compact(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class JsonLines(logging.Formatter):
    """One JSON object per record, for log collectors in a cluster."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


#: bitsandbytes logs this on CPU machines whose 4-bit matmul kernel would come from the Hub, which
#: every stage refuses (`__main__.refuse_hub_kernels`); its own fallback runs: said once in
#: docs/trainer.md, not per stage.
_QUIET = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward"}


class _Drop(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def setup_logging() -> None:
    """One logging configuration per entry point; JSON lines when KUBETRAIN_LOG_FORMAT=json."""
    for name, prefix in _QUIET.items():
        logging.getLogger(name).addFilter(_Drop(prefix))
    handler = logging.StreamHandler()
    if os.environ.get("KUBETRAIN_LOG_FORMAT") == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = os.environ.get("KUBETRAIN_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, handlers=[handler], force=True)
