"""The installed environment is the one the README promises: consistent (pip check) and,
where constraints.txt pins a package, at the pinned version."""
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ON_CI

ROOT = Path(__file__).resolve().parents[2]


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def test_pip_check_finds_no_broken_requirement():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, f"pip check: the environment is broken:\n{result.stdout}{result.stderr}"


def test_installed_packages_are_at_their_pinned_versions():
    if not ON_CI:
        pytest.skip("checked on CI (CI=true), whose virtualenv installs with -c constraints.txt")
    wrong = {}
    for name, version in pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = f"{installed} installed, {version} pinned"
    assert not wrong, f"not the tested set (constraints.txt): {wrong}"


def test_the_readme_test_command_installs_with_the_constraints():
    command = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_command.py"), "tests"],
                             capture_output=True, text=True, check=True).stdout
    assert "-c constraints.txt" in command and "python -m pytest" in command, command
