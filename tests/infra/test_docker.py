"""The training image: pins that agree with requirements.lock, a non-root user, a working entry point."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.infra._infra import (
    DOCKERFILE,
    INFRA,
    REPO,
    dockerfile_args,
    dockerfile_env,
    dockerfile_instructions,
    image_parts,
    image_tag_problem,
    lock_module,
    lock_pins,
    our_image,
    substitute,
)

ENTRYPOINT = INFRA / "docker" / "entrypoint.sh"
RAY_TAG = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<pyminor>\d+)-(?P<cuda>cu\d{3})$")


@pytest.fixture(scope="module")
def instructions():
    return dockerfile_instructions()


def _base_image(instructions) -> str:
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) == 1, f"expected one build stage, got FROM {froms}"
    return substitute(froms[0], dockerfile_args(instructions))


def test_base_image_is_a_pinned_ray_cuda_tag_matching_the_lock(instructions):
    base = _base_image(instructions)
    assert image_tag_problem(base) is None, image_tag_problem(base)
    match = RAY_TAG.match(base)
    assert match, f"expected rayproject/ray:<ray>-py<XY>-cu<NNN>, got {base}"
    assert match["ray"] == lock_pins()["ray"], "the image's Ray must be the Ray every client runs (the lock's)"
    # The lock was resolved with this interpreter (the project's .venv), so the image uses the same minor version.
    assert (int(match["py"]), int(match["pyminor"])) == sys.version_info[:2]


def test_cuda_torch_matches_the_lock_and_the_base_image(instructions):
    args = dockerfile_args(instructions)
    base_cuda = RAY_TAG.match(_base_image(instructions))["cuda"]
    assert args["TORCH_VERSION"] == lock_pins()["torch"]
    assert args["TORCH_CUDA"] == base_cuda, "torch's CUDA build must be the base image's CUDA"
    assert args["TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/{base_cuda}"
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    torch_install = [r for r in runs if "--index-url" in r and "torch==" in r]
    assert len(torch_install) == 1, "torch comes from the CUDA index, in one step"
    # Everything after torch is the lock, installed hash-checked with no resolution of its own; the project is
    # built with the locked setuptools (no isolated build fetching tools unhashed); the build checks the result.
    later = runs[runs.index(torch_install[0]) + 1 :]
    lock_installs = [r for r in later if "-r requirements.lock" in r]
    assert lock_installs and all("--require-hashes" in r and "--no-deps" in r for r in lock_installs)
    assert not any("-c requirements.lock" in r for r in later), "a hashed lock as constraints needs pinned requirements"
    project = [r for r in later if re.search(r"pip install [^&]*--no-deps --no-build-isolation \.(\s|$)", r)]
    assert len(project) == 1, "the project is installed from the checkout with the locked setuptools"
    assert runs.index(project[0]) > runs.index(lock_installs[-1])
    assert any("check_lock.py requirements.lock --require-cuda" in r for r in later)


def test_the_final_user_is_not_root_and_sudo_is_removed(instructions):
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, "the image must name its user"
    assert users[-1] not in {"root", "0", "0:0"}, f"the image ends as {users[-1]}"
    removing = " ".join(rest for keyword, rest in instructions if keyword == "RUN" and "sudoers" in rest)
    assert "NOPASSWD" in removing and "not allowed to run sudo" in removing


def test_ray_job_stop_gives_the_driver_the_same_grace_here_and_on_the_local_cluster(instructions):
    """`ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S: Ray's default, 3 s, is too soon for
    `train` to checkpoint the step it stops at, flush MLflow and release its lease. The image and infra/local set
    one value, and Ray's job supervisor still reads that name."""
    from ray.dashboard.modules.job import job_supervisor

    spec = importlib.util.spec_from_file_location("local_services", INFRA / "local" / "services.py")
    services = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(services)
    grace = dockerfile_env(instructions)["RAY_JOB_STOP_WAIT_TIME_S"]
    assert grace == services.JOB_STOP_ENV["RAY_JOB_STOP_WAIT_TIME_S"] and int(grace) >= 60
    assert '"RAY_JOB_STOP_WAIT_TIME_S"' in inspect.getsource(job_supervisor)


def test_entry_point_is_the_checked_script_in_exec_form(instructions):
    entry = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert len(entry) == 1 and entry[0].startswith("["), "exec form, so signals reach the process"
    target = json.loads(entry[0])
    copies = [shlex.split(rest) for keyword, rest in instructions if keyword == "COPY"]
    assert any(c[-1] == target[0] and "infra/docker/entrypoint.sh" in c for c in copies)


def test_copy_sources_exist_and_are_not_ignored(instructions):
    ignored = {
        line.strip()
        for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "data", "shards", "runs", "**/.env"} <= ignored
    for keyword, rest in instructions:
        if keyword != "COPY":
            continue
        sources = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert source.split("/")[0] not in ignored, f"COPY {source}: excluded by Dockerfile.dockerignore"


def test_paths_the_manifests_use_inside_the_image_are_where_the_dockerfile_puts_the_repo(instructions):
    home = dockerfile_env(instructions)["SSD_HOME"]
    env = dockerfile_env(instructions)
    workdirs = [substitute(rest, env) for keyword, rest in instructions if keyword == "WORKDIR"]
    assert workdirs[-1] == home == "/home/ray/ssd"  # infra/k8s/rayjob.yaml refers to /home/ray/ssd/...
    # The image the manifests name says the Python and CUDA that the Dockerfile builds.
    cuda = RAY_TAG.match(_base_image(instructions))["cuda"]
    _, tag, _ = image_parts(our_image())
    assert tag.endswith(f"-py{sys.version_info[0]}{sys.version_info[1]}-{cuda}")


# ------------------------------------------------------------------------------------------ entry point
def _entrypoint(args, env, *, as_nobody):
    """Run entrypoint.sh with a clean environment; as_nobody drops root first (setpriv) when we are root."""
    command = ["bash", env.pop("_SCRIPT", str(ENTRYPOINT)), *args]
    if as_nobody and os.geteuid() == 0:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    base = {"PATH": f"{env.pop('_BIN', '')}:/usr/bin:/bin"}
    return subprocess.run(command, env={**base, **env}, capture_output=True, text=True, timeout=20, input="")


@pytest.fixture
def shared_tmp():
    """A temporary folder the unprivileged user can reach (pytest's tmp_path sits below a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="ssd-entrypoint-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def sandbox(shared_tmp):
    """A world-readable HOME, a fake `ray` on PATH that prints its arguments (no Ray is started), and a
    copy of entrypoint.sh that the unprivileged user can read wherever the checkout lies (a clone below a
    0700 folder, as `mktemp -d` makes, is out of its reach)."""
    tmp_path = shared_tmp
    script = tmp_path / "entrypoint.sh"
    shutil.copy(ENTRYPOINT, script)
    script.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(mode=0o755)
    fake = bin_dir / "ray"
    fake.write_text('#!/bin/sh\necho "fake-ray $*"\n')
    fake.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir(mode=0o777)
    return {"HOME": str(home), "_BIN": str(bin_dir), "_SCRIPT": str(script)}


@pytest.mark.skipif(shutil.which("setpriv") is None and os.geteuid() == 0, reason="needs setpriv to drop root")
def test_entrypoint_execs_its_arguments(sandbox):
    result = _entrypoint(["echo", "hello from the image"], dict(sandbox), as_nobody=True)
    assert (result.returncode, result.stdout) == (0, "hello from the image\n"), result.stderr


@pytest.mark.skipif(shutil.which("setpriv") is None and os.geteuid() == 0, reason="needs setpriv to drop root")
def test_entrypoint_without_arguments_runs_bash(sandbox):
    command = ["bash", sandbox["_SCRIPT"]]
    if os.geteuid() == 0:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    result = subprocess.run(
        command,
        env={"PATH": "/usr/bin:/bin", "HOME": sandbox["HOME"]},
        input="echo $0-ok\n",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0 and result.stdout.strip() == "bash-ok", result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can check the refusal to run as root")
def test_entrypoint_refuses_root_unless_allowed(sandbox):
    refused = _entrypoint(["echo", "x"], dict(sandbox), as_nobody=False)
    assert refused.returncode == 64 and "refusing to run as root" in refused.stderr
    allowed = _entrypoint(["echo", "x"], {**sandbox, "SSD_ALLOW_ROOT": "1"}, as_nobody=False)
    assert (allowed.returncode, allowed.stdout) == (0, "x\n")


@pytest.mark.skipif(shutil.which("setpriv") is None and os.geteuid() == 0, reason="needs setpriv to drop root")
def test_entrypoint_token_mode_needs_a_token_for_ray_commands(sandbox, shared_tmp):
    tmp_path = shared_tmp
    token_mode = {**sandbox, "RAY_AUTH_MODE": "token"}
    missing = _entrypoint(["ray", "start", "--head"], dict(token_mode), as_nobody=True)
    assert missing.returncode == 78 and "no token" in missing.stderr and "fake-ray" not in missing.stdout

    empty = tmp_path / "empty_token"
    empty.write_text("")
    empty.chmod(0o644)
    empty_path = _entrypoint(["ray", "start"], {**token_mode, "RAY_AUTH_TOKEN_PATH": str(empty)}, as_nobody=True)
    assert empty_path.returncode == 78

    token = tmp_path / "token"
    token.write_text("0123456789abcdef")
    token.chmod(0o644)
    for extra in ({"RAY_AUTH_TOKEN": "0123456789abcdef"}, {"RAY_AUTH_TOKEN_PATH": str(token)}):
        ok = _entrypoint(["ray", "start", "--head"], {**token_mode, **extra}, as_nobody=True)
        assert (ok.returncode, ok.stdout) == (0, "fake-ray start --head\n"), ok.stderr

    default_path = Path(sandbox["HOME"]) / ".ray" / "auth_token"  # Ray's own default location
    default_path.parent.mkdir(mode=0o755)
    default_path.write_text("0123456789abcdef")
    default_path.chmod(0o644)
    assert _entrypoint(["ray", "status"], dict(token_mode), as_nobody=True).returncode == 0


@pytest.mark.skipif(shutil.which("setpriv") is None and os.geteuid() == 0, reason="needs setpriv to drop root")
def test_entrypoint_checks_the_token_only_where_it_matters(sandbox):
    # Not a ray command, or token auth off: nothing to check.
    assert _entrypoint(["echo", "ok"], {**sandbox, "RAY_AUTH_MODE": "token"}, as_nobody=True).stdout == "ok\n"
    no_auth = _entrypoint(["ray", "start"], dict(sandbox), as_nobody=True)
    assert (no_auth.returncode, no_auth.stdout) == (0, "fake-ray start\n")


def test_entrypoint_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True).returncode == 0


# ----------------------------------------------------------------------------------------- check_lock
def test_check_lock_passes_on_the_project_environment(capsys):
    # .venv was installed with the lock as constraints (Makefile), so it must match it.
    assert lock_module().main([str(REPO / "requirements.lock")]) == 0, capsys.readouterr().err


def test_check_lock_reports_a_drifted_pin(tmp_path, capsys):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# comment\nnumpy==0.0.1\nnot-installed-anywhere==1.0\n")
    assert lock_module().main([str(lock)]) == 1
    err = capsys.readouterr().err
    assert "numpy: requirements.lock pins 0.0.1, installed" in err
    assert "not-installed-anywhere" not in err  # a pin of something not installed (a dev tool) is fine


def test_check_lock_rules_by_hand():
    check = lock_module()
    # PEP 440: a pin without a local label matches any local build of that version, and nothing else.
    assert check.lock_problems({"torch": "2.13.0"}, {"torch": "2.13.0+cu128"}) == []
    assert check.lock_problems({"torch": "2.13.0"}, {"torch": "2.13.0+cpu"}) == []
    assert len(check.lock_problems({"torch": "2.13.0"}, {"torch": "2.12.1+cu128"})) == 1
    assert check.requirement_problems(['pytest; extra == "dev"'], {}) == []  # extras are optional
    assert check.requirement_problems(["numpy>=2"], {"numpy": "1.26.4"}) == [
        "numpy: required by ssd-pipeline (numpy>=2), installed 1.26.4"
    ]
    assert check.requirement_problems(["webdataset==1.0.2"], {}) == [
        "webdataset: required by ssd-pipeline (webdataset==1.0.2), not installed"
    ]


def test_check_lock_follows_the_runtime_dependencies_with_their_extras():
    closure = lock_module().runtime_closure()
    # Direct requirements of ssd-pipeline, and aiohttp, which only ray's "default" extra brings in.
    assert {"torch", "ray", "mlflow", "webdataset", "omegaconf", "aiohttp"} <= closure
    assert "pytest" not in closure and "ruff" not in closure  # the [dev] extra is not a runtime need
    assert "ssd-pipeline" not in closure


def test_check_lock_ignores_pins_outside_the_runtime_dependencies():
    check = lock_module()
    pins, installed = {"pluggy": "1.6.0"}, {"pluggy": "1.0.0"}  # e.g. conda's pluggy in the base image
    assert check.lock_problems(pins, installed, only={"torch"}) == []
    assert len(check.lock_problems(pins, installed, only={"pluggy"})) == 1


def test_check_lock_rejects_a_malformed_lock(tmp_path):
    lock = tmp_path / "requirements.lock"
    for text, line in [
        ("numpy>=1\n", 1),  # not an exact pin
        ("# header\nsix==1.17.0 \\\n    --hash=md5:0123\n", 2),  # not a sha256 digest
        ("six==1.17.0 --index-url https://example.org/simple\n", 1),  # an option pip would obey
        ("six==1.17.0\nSix==1.16.0\n", 2),  # the same project twice (names compare canonically)
        ("six==1.17.0 \\\n", 1),  # a continuation that never ends
    ]:
        lock.write_text(text)
        with pytest.raises(ValueError, match=rf"requirements.lock:{line}: "):
            lock_module().read_lock(lock)


def test_check_lock_reads_pip_compile_entries_with_their_hashes(tmp_path):
    lock = tmp_path / "requirements.lock"
    a, b = "a" * 64, "0123456789abcdef" * 4
    lock.write_text(
        "#\n# header\n#\n"
        f"Six==1.17.0 \\\n    --hash=sha256:{a} \\\n    --hash=sha256:{b}\n    # via\n    #   dvc\n"
        f"torch==2.13.0 \\\n    --hash=sha256:{b}\n    # via ssd-pipeline (pyproject.toml)\n"
    )
    locked = lock_module().read_locked(lock)
    assert locked == {"six": ("1.17.0", (a, b), 4), "torch": ("2.13.0", (b,), 9)}
    assert lock_module().read_lock(lock) == {"six": "1.17.0", "torch": "2.13.0"}


def test_check_lock_knows_a_cpu_torch_from_a_cuda_one():
    import torch

    expected = "cpu" if not torch.version.cuda else "cu" + "".join(torch.version.cuda.split(".")[:2])
    assert lock_module().cuda_problems(expected) == []
    other = "cu128" if expected != "cu128" else "cu999"
    assert lock_module().cuda_problems(other) == [
        f"torch: expected a {other} build, got torch {torch.__version__} ({expected})"
    ]
