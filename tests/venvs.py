"""Virtual environments of their own for the tests that need another SDK generation or a published server.

The test run's own environment has mcp 2.x. A server on mcp 1.x, fastmcp 2.x/3.x, the oldest anyio the project
allows, or a published server from PyPI runs in an environment made for it here, with loopwatch installed from
this checkout, and is driven from the test process (a real MCP client of the run's own SDK, in both protocol
eras) over stdio or HTTP -- as a user's client drives it.

`sdk_venv(name, requirements)` makes `.venvs/<name>` at the top of the checkout once and reuses it while the
requirements are the same (a stamp file holds them); a failed install says what uv and pip printed. Installs are
bounded in time. The folder is ignored by git.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venvs"
INSTALL_TIMEOUT = 600.0


class Venv:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.bin = path / "bin"
        self.python = str(self.bin / "python")

    def exe(self, name: str) -> str:
        """A console script installed in this environment."""
        return str(self.bin / name)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment to run this venv's programs with: its bin first on PATH, no leaked PYTHONPATH."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.path)
        env.update(extra)
        return env

    def version(self, dist: str) -> str | None:
        """The installed version of a distribution in this environment (None if absent)."""
        code = (
            "import importlib.metadata as m, sys\n"
            "try: print(m.version(sys.argv[1]))\n"
            "except m.PackageNotFoundError: print('')\n"
        )
        out = subprocess.run([self.python, "-c", code, dist], capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or None


def _uv() -> str | None:
    """uv, from the test run's own environment (the `test` extra has it) or PATH; None if neither has it."""
    beside = Path(sys.executable).parent / "uv"
    if beside.exists():
        return str(beside)
    return shutil.which("uv")


def _attempt(cmd: list[str], what: str) -> str | None:
    """Run one install command: None when it worked, else what it printed."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    if done.returncode == 0:
        return None
    return f"{what} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


def _install(python: str, args: list[str]) -> None:
    """Install `args` into the environment of `python`: with uv when there is one, else (or if uv fails) pip.

    uv resolves and installs the same requirements as pip in a tenth of the time (5 s against 48 s for the
    fastmcp 3.x environment, with nothing cached): the six environments cost the run about 4 minutes with pip.
    """
    uv = _uv()
    failures = []
    if uv is not None:
        failure = _attempt([uv, "pip", "install", "-q", "--python", python, *args], f"uv pip install {' '.join(args)}")
        if failure is None:
            return
        failures.append(failure)
    if subprocess.run([python, "-m", "pip", "--version"], capture_output=True, timeout=60).returncode != 0:
        subprocess.run([python, "-m", "ensurepip"], capture_output=True, timeout=300)  # made for uv, without pip
    # --no-compile: a quarter less install time; the few modules a test imports compile as they load.
    cmd = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile", *args]
    failure = _attempt(cmd, f"pip install {' '.join(args)}")
    if failure is not None:
        raise RuntimeError("\n".join([*failures, failure]))


def sdk_venv(name: str, requirements: list[str], *, loopwatch: str | None = "", no_deps_loopwatch: bool = False) -> Venv:
    """A virtual environment `.venvs/<name>` with `requirements` and loopwatch from this checkout.

    `loopwatch` is the extras spec to install it with ("" for the core, "[all]", ...), or None to leave
    loopwatch out (a server environment loopwatch must reach by itself). Installed in one pip run with the
    requirements, so pip must find versions that satisfy both: installing loopwatch never moves the SDK.
    """
    spec = {"python": sys.version, "requirements": requirements, "loopwatch": loopwatch, "no_deps": no_deps_loopwatch}
    stamp_text = json.dumps(spec, sort_keys=True)
    path = VENVS / name
    stamp = path / "loopwatch-test-stamp.json"
    venv = Venv(path)
    if stamp.exists() and stamp.read_text() == stamp_text and Path(venv.python).exists():
        return venv
    VENVS.mkdir(exist_ok=True)
    if path.exists():
        shutil.rmtree(path)
    # Without pip when uv installs (pip's own install is 7 of a 10 s environment); `_install` adds it if uv fails.
    without_pip = ["--without-pip"] if _uv() is not None else []
    subprocess.run([sys.executable, "-m", "venv", *without_pip, str(path)], check=True, timeout=300)
    args = list(requirements)
    if loopwatch is not None and not no_deps_loopwatch:
        args = ["-e", f"{ROOT}{loopwatch}", *args]
    if args:
        _install(venv.python, args)
    if loopwatch is not None and no_deps_loopwatch:
        _install(venv.python, ["--no-deps", "-e", str(ROOT)])
    stamp.write_text(stamp_text)
    return venv


def venv_fixture(name: str, requirements: list[str], **kwargs):
    """A session-scoped pytest fixture for `sdk_venv(...)`; the install failing fails the tests that use it."""

    @pytest.fixture(scope="session")
    def _fixture() -> Venv:
        return sdk_venv(name, requirements, **kwargs)

    return _fixture
