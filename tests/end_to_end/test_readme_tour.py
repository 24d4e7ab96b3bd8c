"""The README's stand-in tour, run as a new user runs it: its own lines, as written.

Real: the README's two shell blocks (the stand-in command, then the lines pasted into another
shell) run by bash from the repository root with `.venv/bin` first on PATH, so `python`,
`kubectl` (1.37), `kubetrain operator` (the real Kopf operator) and every trainer stage are the
real processes; the lines the stand-in prints. Substituted, as the README allows: the port and
the directory (a free port, a temporary directory), and the operator's and trainers' metrics
ports (machines here run several test sessions at once). Emulated: the cluster (the stand-in,
docs/standin.md). The run is the README's: the shipped tiny example, watched until `kubectl get
tr -w` shows STEP, LOSS and ETA, which only the operator's scrape of the trainer fills in.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ports import free_port
from runspecs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
BIN = Path(sys.executable).parent
README_PORT, README_DIR = "8555", "/tmp/standin"


def tour_blocks() -> tuple[str, str]:
    """The stand-in command and the block pasted into the other shell, from the tour section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    tour = text.split("## A short tour", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", tour, flags=re.S)
    start = next(i for i, block in enumerate(blocks) if block.startswith("python -m standin"))
    return blocks[start].strip(), blocks[start + 1]


def substituted(text: str, port: int, workdir: Path) -> str:
    return text.replace(README_PORT, str(port)).replace(README_DIR, str(workdir))


def lines_of(stream: Iterator[str]) -> queue.Queue[str]:
    """The stream's lines as they come, from a thread (a watch never ends on its own)."""
    found: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            found.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return found


def progress_row(line: str) -> bool:
    """`tinystories-cpu  Training  40  2.3456  1m02s  False  2m` from `kubectl get tr -w`."""
    cells = line.split()
    if len(cells) < 5 or cells[0] != "tinystories-cpu" or cells[1] in ("Succeeded", "Failed"):
        return False
    return (
        cells[2].isdigit()
        and int(cells[2]) > 0
        and re.fullmatch(r"\d+\.\d+", cells[3]) is not None
        and re.fullmatch(r"(\d+h)?(\d+m)?\d*s?", cells[4]) is not None
    )


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to the process group (the stand-in stops its pods, Kopf its handlers), SIGKILL to
    whatever is left after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    with contextlib.suppress(ProcessLookupError):
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            proc.poll()
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_the_readme_tour_shows_step_loss_and_eta(tmp_path: Path) -> None:
    standin_line, shell = tour_blocks()
    port, workdir = free_port(), tmp_path / "standin"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "KUBETRAIN_OPERATOR_METRICS_PORT": "0",
        "KUBETRAIN_TRAINER_METRICS_PORT": str(free_port()),
    }
    standin = subprocess.Popen(
        ["bash", "-c", substituted(standin_line, port, workdir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    tour: subprocess.Popen[str] | None = None
    try:
        assert standin.stdout is not None
        printed = [standin.stdout.readline().strip(), standin.stdout.readline().strip()]
        assert printed[0] == str(workdir / "kubeconfig"), printed
        # The line the stand-in says to paste is the README's own first line of the next block.
        assert printed[1] == substituted(shell.splitlines()[0], port, workdir), printed
        assert "KUBETRAIN_METRICS_ENDPOINTS=" in printed[1]
        tour = subprocess.Popen(
            ["bash", "-c", substituted(shell, port, workdir)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its background operator goes with it at the end
        )
        assert tour.stdout is not None
        seen, found = lines_of(tour.stdout), []
        deadline = time.monotonic() + 900
        while not any(progress_row(line) for line in found):
            assert tour.poll() is None, "".join(found)
            assert time.monotonic() < deadline, "no STEP/LOSS/ETA within 900 s:\n" + "".join(found)
            try:
                found.append(seen.get(timeout=5))
            except queue.Empty:
                continue
        header = ["NAME", "PHASE", "STEP", "LOSS", "ETA"]
        assert any(line.split()[:5] == header for line in found), found
    finally:
        if tour is not None:
            stop(tour)
        stop(standin)
