"""The deploy files agree with each other and with the package: Railpack builds every service, the
start commands are the Procfile's, and the build installs this project on a Python it supports."""

from __future__ import annotations

import json
import re
import tomllib

from tests.support import ROOT


def test_every_railway_service_is_built_by_railpack_and_starts_what_the_procfile_says() -> None:
    procfile = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip())
    expected = {
        "railway.json": procfile["web"],
        "railway.worker.json": procfile["worker"],
        "railway.projector.json": "exec nova projector",
    }
    for name, start in expected.items():
        config = json.loads((ROOT / name).read_text())
        assert config["build"]["builder"] == "RAILPACK", name
        assert config["deploy"]["startCommand"] == start, name
    assert json.loads((ROOT / "railway.json").read_text())["deploy"]["healthcheckPath"] == "/health"


def test_railpack_installs_this_project_on_a_supported_python() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # Railpack installs a Python project only through requirements.txt (or a uv/poetry/pdm lock file).
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert [line for line in lines if line.strip()] == [f"{project['name']} @ file:///app"]
    python = json.loads((ROOT / "railpack.json").read_text())["packages"]["python"]
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", project["requires-python"])
    assert minimum and tuple(map(int, python.split("."))) >= (int(minimum[1]), int(minimum[2]))
    # The project's scripts are what the start commands run.
    assert project["scripts"]["nova"] == "cli.main:app"
