"""The launcher seam: a launcher builds a stage's command and environment from its typed config; the registry finds
launchers by module name."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from qllm.errors import QllmConfigError
from qllm.stages import launchers
from qllm.stages.launchers import LaunchContext, Launcher, LauncherConfig


def test_every_launcher_implements_the_protocol_with_a_typed_config():
    assert launchers.names() == ["local"]
    for name in launchers.names():
        launcher = launchers.get(name)
        assert isinstance(launcher, Launcher) and launcher.name == name
        assert issubclass(launcher.config, LauncherConfig) and launcher.config().name == name
        assert (Path(__file__).parents[2] / "conf" / "launch" / f"{name}.yaml").is_file()


def test_local_command_fills_only_its_placeholders():
    local = launchers.get("local")
    ctx = LaunchContext(python="/venv/bin/python", port=29577, workdir=Path("/w"))
    settings = {"name": "local", "prefix": ["{python}", "-c", "print({'a': 1})", "--port={port}"], "nproc": 1,
                "timeout_s": None}
    assert local.command(settings, "qllm.stages.evaluate", ["--cell", "c.json"], ctx) == [
        "/venv/bin/python", "-c", "print({'a': 1})", "--port=29577", "-m", "qllm.stages.evaluate", "--cell", "c.json"]
    assert local.env(settings, ctx) == {} and local.ranks(settings) == 1
    assert local.ranks({**settings, "nproc": 4}) == 4


@pytest.mark.parametrize("settings, message", [
    ({"prefix": [], "nproc": 1}, "launch prefix is empty"),
    ({"prefix": ["{python}"], "nproc": 0}, "launch nproc must be >= 1; got 0"),
])
def test_local_refuses_what_cannot_launch(settings, message):
    with pytest.raises(QllmConfigError, match=message):
        launchers.get("local").validate({"name": "local", "timeout_s": None, **settings})


def test_common_settings_are_in_the_base_config():
    assert [f.name for f in fields(LauncherConfig)] == ["name", "timeout_s"]
