"""The one way a duration is shown to people: `kubectl get` (the operator's ETA column) and
`kubetrain run` (the CLI's and the trainer's progress lines) must agree on the same seconds; and
the one way the spec's durations (`stallTimeout`, `stageDeadline`) are read."""

import re


def format_duration(seconds: float) -> str:
    """`14h02m`, `5m07s`, `42s`: short enough for a printer column; hours once there are any
    (never `842m00s`). Rounds to the nearest second (42.7 s is `43s`); negative is `0s`."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def duration_seconds(text: str) -> float:
    """`15m`, `1h30m`, `90s` (the API's duration pattern) → seconds."""
    total = 0.0
    for number, unit in re.findall(r"([0-9]+)([hms])", text):
        total += int(number) * {"h": 3600, "m": 60, "s": 1}[unit]
    return total
