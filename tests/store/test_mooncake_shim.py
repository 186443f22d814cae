"""The drop-in ``mooncake`` package (shims/mooncake): Mooncake's import names give kvcake's
store, and ``make mooncake-shim`` never installs it over Mooncake's own wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "shims" / "mooncake"
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls"
case "$*" in
  "-m pip list") cat "$(dirname "$0")/installed" ;;
esac
exit 0
"""


def test_mooncake_store_names_are_kvcakes_under_pythonpath() -> None:
    code = ("import mooncake, mooncake.store as s, kvcake.store.compat as c; "
            "assert 'drop-in' in mooncake.__doc__ and 'kvcake' in mooncake.__doc__; "
            "assert s.MooncakeDistributedStore is c.DistributedStore; "
            "assert s.ReplicateConfig().soft_pin_action is s.SoftPinAction.PRESERVE; "
            "print(mooncake.__file__)")
    env = {**os.environ, "PYTHONPATH": str(SHIM)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.strip() == str(SHIM / "mooncake" / "__init__.py")


def test_kvcake_itself_does_not_provide_mooncake() -> None:
    """No ``mooncake`` from kvcake's own tree; the real Mooncake (the store bench's
    ``[mooncake]`` extra) may be installed beside it."""
    code = ("import importlib.util as u; s = u.find_spec('mooncake'); "
            "print(s.origin if s else 'None')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    origin = done.stdout.strip()
    assert origin == "None" or "kvcake" not in Path(origin).read_text(), origin


def fake_venv(tmp_path: Path, installed: str) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (venv / "bin" / "installed").write_text(installed)
    return venv


def make_shim(venv: Path) -> tuple[int, str, list[str]]:
    done = subprocess.run(["make", "-s", "mooncake-shim", f"VENV={venv}"], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    calls = venv / "bin" / "calls"
    return done.returncode, done.stderr, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize("wheel", ["mooncake-transfer-engine", "mooncake-transfer-engine-non-cuda",
                                   "Mooncake-Transfer-Engine-cuda13"])
def test_make_refuses_a_venv_with_mooncakes_own_wheel(tmp_path: Path, wheel: str) -> None:
    venv = fake_venv(tmp_path, f"kvcake 0.1.0\n{wheel} 0.3.9\nmsgspec 0.19\n")
    code, stderr, calls = make_shim(venv)
    assert code != 0 and "Mooncake's own wheel" in stderr
    assert not any("pip install" in c for c in calls)


def test_make_installs_the_shim_alone_elsewhere(tmp_path: Path) -> None:
    venv = fake_venv(tmp_path, "kvcake 0.1.0\nmsgspec 0.19\n")
    code, stderr, calls = make_shim(venv)
    assert code == 0, stderr
    assert calls[-1] == "-m pip install -q --no-deps ./shims/mooncake"
