"""The Dockerfiles, read as a builder would read them (no container engine runs here).

Real: the files themselves, pyproject.toml's extras, .dockerignore's patterns and the chart's
defaults. Not real: no image is built (CI has no Docker engine); what a build would find missing —
a COPY source, an extra, a file the context leaves out — is checked here instead.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from chart_support import CHART, ROOT, named, render

IMAGES = {"operator": ROOT / "images" / "operator", "trainer": ROOT / "images" / "trainer"}
EXTRAS = set(
    tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
)
OCI_LABELS = {"title", "description", "version", "revision", "source", "licenses"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = pending + line
        pending = ""
        word, _, rest = text.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def args_of(path: Path) -> dict[str, str]:
    found = {}
    for word, rest in instructions(path):
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            found[name] = value
    return found


def bases(path: Path) -> list[str]:
    values = args_of(path)
    images = []
    for word, rest in instructions(path):
        if word == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], image))
    return images


def ignored(relative: str) -> bool:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    parts = Path(relative).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) for pattern in patterns for prefix in prefixes)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_every_copied_file_exists_and_is_in_the_build_context(image: str) -> None:
    copies = [rest for word, rest in instructions(IMAGES[image] / "Dockerfile") if word == "COPY"]
    sources = []
    for rest in copies:
        words = shlex.split(rest)
        if any(w.startswith("--from=") for w in words):
            continue
        sources += [w for w in words[:-1] if not w.startswith("--")]
    assert {"pyproject.toml", "operator", "trainer", "contract"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"{image}: COPY {source}: no such file in the repository"
        assert not ignored(source), f"{image}: COPY {source}: .dockerignore leaves it out"


@pytest.mark.parametrize(("image", "extra"), [("operator", "operator"), ("trainer", "trainer")])
def test_the_install_line_names_existing_extras(image: str, extra: str) -> None:
    runs = " ".join(r for w, r in instructions(IMAGES[image] / "Dockerfile") if w == "RUN")
    named_extras = set(re.findall(r"'(?:\.|kubetrain)\[([\w,-]+)\]'", runs))
    assert named_extras, f"{image}: no pip install of the project with an extra"
    for group in named_extras:
        assert set(group.split(",")) <= EXTRAS, f"{image}: [{group}] vs pyproject {EXTRAS}"
    assert extra in {e for group in named_extras for e in group.split(",")}


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_bases_are_pinned_and_the_user_is_not_root(image: str) -> None:
    dockerfile = IMAGES[image] / "Dockerfile"
    for base in bases(dockerfile):
        name, _, tag = base.rpartition(":")
        assert name and tag and tag != "latest", base
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{base}: pin a full version"
    users = [rest for word, rest in instructions(dockerfile) if word == "USER"]
    assert users and users[-1] == "1000:1000"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_oci_labels_carry_the_version_build_arg(image: str) -> None:
    dockerfile = IMAGES[image] / "Dockerfile"
    labels = " ".join(r for w, r in instructions(dockerfile) if w == "LABEL")
    found = dict(re.findall(r'org\.opencontainers\.image\.(\w+)="([^"]*)"', labels))
    assert set(found) >= OCI_LABELS
    assert found["version"] == "${VERSION}"
    assert (
        args_of(dockerfile)["VERSION"]
        == yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    )


def test_trainer_image_prebuilds_deepspeed_ops_on_cuda_torch() -> None:
    dockerfile = IMAGES["trainer"] / "Dockerfile"
    text = " ".join(r for _, r in instructions(dockerfile))
    assert all("nvidia/cuda" in base for base in bases(dockerfile))
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cu" in text
    for op in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1"):
        assert op in text
    assert "installed_ops" in text  # the build fails when an op was not compiled


def test_operator_image_runs_the_operator_command_the_chart_runs() -> None:
    words = dict(instructions(IMAGES["operator"] / "Dockerfile"))
    entrypoint, cmd = yaml.safe_load(words["ENTRYPOINT"]), yaml.safe_load(words["CMD"])
    (container,) = named(render({}), "Deployment", "kubetrain")["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["command"] == entrypoint == ["kopf"]
    assert (
        cmd[:4] == container["args"][:4] == ["run", "--standalone", "-m", "kubetrain_operator.main"]
    )


def test_chart_defaults_point_at_the_images() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["operator"]["image"]["repository"] == "ghcr.io/kubetrain/operator"
    assert values["trainer"]["image"]["repository"] == "ghcr.io/kubetrain/trainer"
    for image in ("operator", "trainer"):
        build = (IMAGES[image] / "Dockerfile").read_text()
        assert f"-t ghcr.io/kubetrain/{image}:" in build  # the documented build tags the default


def test_the_dockerignore_check_can_fail() -> None:
    assert ignored(".venv/bin/python") and ignored("tests/conftest.py")
    assert not ignored("operator/kubetrain_operator/api.py")
