"""The one way a duration is shown to people: `kubectl get` (the operator's ETA column) and
`kubetrain run` (the CLI's and the trainer's progress lines) must agree on the same seconds."""


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
