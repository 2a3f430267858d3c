"""requirements.lock and requirements-tools.lock: exact pins with hashes, installed hash-checked by the Makefile."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.infra._infra import REPO, lock_module

LOCKS = ["requirements.lock", "requirements-tools.lock"]
ENTRY_LINE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[^\s\\]+ \\$")  # name==version, hashes follow
HASH_LINE = re.compile(r"^    --hash=sha256:[0-9a-f]{64}( \\)?$")  # the last hash of an entry has no backslash
CUDA_PACKAGE = re.compile(r"^(nvidia-|triton|cuda-|cupy)")


def _make_commands(target: str) -> list[str]:
    """The shell commands ``make target`` runs, prerequisites included (``make -n -B``: printed, not run)."""
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}  # under make test
    result = subprocess.run(["make", "-n", "-B", target], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line.strip() for line in result.stdout.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.parametrize("name", LOCKS)
def test_every_line_of_the_lock_is_an_exact_pin_or_one_of_its_sha256_hashes(name):
    lines = (REPO / name).read_text(encoding="utf-8").splitlines()
    previous = ""
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            assert not previous.endswith("\\"), f"{name}:{number}: a continuation ends in a comment or blank line"
            previous = line
            continue
        if line.startswith(" "):
            assert HASH_LINE.match(line), f"{name}:{number}: expected '    --hash=sha256:<64 hex>', got {line!r}"
            assert previous.endswith("\\"), f"{name}:{number}: a hash outside an entry"
        else:
            assert ENTRY_LINE.match(line), f"{name}:{number}: expected 'name==version \\' and hashes, got {line!r}"
        previous = line
    locked = lock_module().read_locked(REPO / name)
    assert len(locked) > 10, f"{name}: expected a whole environment, got {len(locked)} entries"
    for project, pin in locked.items():
        assert pin.hashes, f"{name}:{pin.line}: {project} has no hash; pip --require-hashes would refuse the lock"


def test_torch_is_the_cpu_build_and_no_cuda_package_is_locked():
    locked = lock_module().read_locked(REPO / "requirements.lock")
    # No local label: the training image's 2.13.0+cu128 satisfies the same pin (infra/docker/Dockerfile).
    assert locked["torch"].version == "2.13.0"
    # One hash: the CPU wheel pip-compile resolved on this kind of machine; PyPI's 2.13.0 wheels (CUDA) have others.
    assert len(locked["torch"].hashes) == 1
    assert not [p for p in locked if CUDA_PACKAGE.match(p)], "requirements.lock must stay free of CUDA packages"


def test_the_lock_satisfies_every_dependency_pyproject_declares():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    locked = lock_module().read_lock(REPO / "requirements.lock")
    # The project is built without isolation (Makefile), so its build backend must be locked too.
    build = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]["requires"]
    for text in declared + build:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in locked, f"pyproject.toml declares {text!r}; requirements.lock has no {name} (make lock)"
        assert req.specifier.contains(Version(locked[name]), prereleases=True), f"{text!r}: locked {locked[name]}"


def test_the_tools_lock_pins_what_requirements_tools_in_names():
    wanted = [Requirement(line) for line in (REPO / "requirements-tools.in").read_text().split() if line]
    locked = lock_module().read_lock(REPO / "requirements-tools.lock")
    for req in wanted:
        assert str(req.specifier).startswith("=="), f"requirements-tools.in: pin {req.name} exactly"
        assert locked[canonicalize_name(req.name)] == str(req.specifier)[2:], req.name


def test_make_install_is_hash_checked_and_fetches_nothing_unhashed():
    commands = _make_commands("install")
    installs = [c for c in commands if " -m pip install" in c]
    lock_installs = [c for c in installs if "requirements.lock" in c]
    assert len(installs) == 3 and installs[:2] == lock_installs
    assert all("--require-hashes" in c and "--no-deps" in c for c in lock_installs)
    assert not any(" -c " in c for c in installs), "no unpinned requirement may reach pip"
    # The locked setuptools comes first; every later install builds with it instead of an isolated build env,
    # which pip would fill with build tools it does not hash-check.
    assert "setuptools==" in lock_installs[0]
    assert all("--no-build-isolation" in c for c in installs[1:])
    # The project (a checkout cannot be hashed) goes in last, without dependencies of its own.
    assert installs[-1].split(" 2>&1")[0].endswith("--no-deps --no-build-isolation -e .")
    assert commands.index(next(c for c in commands if c.endswith("-m pip check"))) > commands.index(installs[-1])
    assert any("torch.version.cuda" in c for c in commands), "the CPU-torch check stays"


def test_make_lock_and_audit_use_the_hashed_tools_and_stay_out_of_make_test():
    for target in ("lock", "audit"):
        commands = _make_commands(target)
        tools = [c for c in commands if ".venv-tools/bin/python -m pip install" in c]
        assert tools and all("--require-hashes" in c and "-r requirements-tools.lock" in c for c in tools), target
    lock = [c for c in _make_commands("lock") if "pip-compile" in c]
    assert len(lock) == 2 and "--extra dev -o requirements.lock pyproject.toml" in lock[0]
    # --no-emit-*: no machine's own index paths in the locks (each machine's pip config names its indexes).
    for option in [
        "--generate-hashes",
        "--allow-unsafe",
        "--strip-extras",
        "--no-emit-index-url",
        "--no-emit-find-links",
    ]:
        assert all(option in c for c in lock), option
    (audit,) = [c for c in _make_commands("audit") if "pip-audit" in c]
    assert "-r requirements.lock" in audit and "--require-hashes" in audit and "--disable-pip" in audit
    assert "--strict" in audit, "a package the service cannot answer for must fail the audit, not be skipped"
    assert not [c for c in _make_commands("test") if "pip-audit" in c or "pip-compile" in c or "venv-tools" in c]
