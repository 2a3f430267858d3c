"""infra/mlflow/docker-compose.yaml: a team MLflow server (PostgreSQL + MinIO, basic auth) with no default password."""

from __future__ import annotations

import configparser
import re
from urllib.parse import urlparse

import pytest
import yaml

from tests.infra._infra import COMPOSE, INFRA, URL_PASSWORD, image_tag_problem, is_secret_name, lock_pins, strings

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}; $$ is a literal dollar.
INTERPOLATION = re.compile(r"(?<!\$)\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _interpolations():
    """Every ${...} in the file's values (Compose interpolates values, not comments)."""
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return [match for text in strings(compose) for match in INTERPOLATION.finditer(text)]


def _env_example() -> dict[str, str]:
    values = {}
    for line in (INFRA / "mlflow" / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def test_services_and_pinned_images(compose):
    assert {"postgres", "minio", "minio-init", "mlflow"} <= compose["services"].keys()
    for name, service in compose["services"].items():
        assert image_tag_problem(service["image"]) is None, f"{name}: {image_tag_problem(service['image'])}"
    assert compose["services"]["mlflow"]["image"] == f"ghcr.io/mlflow/mlflow:v{lock_pins()['mlflow']}-full"


def test_every_secret_is_a_required_variable_without_default(compose):
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if is_secret_name(key):
                match = INTERPOLATION.fullmatch(str(value))
                assert match and match["op"] == ":?", f"{name}.{key}: must be ${{VAR:?message}}, got {value!r}"
    for match in _interpolations():
        if is_secret_name(match["name"]):
            assert match["op"] == ":?", f"${{{match['name']}{match['op'] or ''}...}}: a secret never has a default"
    for text in strings(compose):
        assert not URL_PASSWORD.search(text), f"a URL with a password: {text}"


def test_env_example_lists_every_required_variable_with_no_value():
    required = {m["name"] for m in _interpolations() if m["op"] == ":?"}
    example = _env_example()
    assert required, "the compose file requires its passwords"
    assert required <= example.keys(), f"missing from .env.example: {required - example.keys()}"
    assert all(example[name] == "" for name in required), "no value, so nobody runs with a shared default"
    used = {m["name"] for m in _interpolations()}
    assert example.keys() <= used, f"unused in docker-compose.yaml: {example.keys() - used}"


def test_mlflow_runs_basic_auth_on_postgres_with_proxied_s3_artifacts(compose):
    mlflow = compose["services"]["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"] and "--app-name=basic-auth" in command and "--serve-artifacts" in command
    options = dict(item.split("=", 1) for item in command if item.startswith("--") and "=" in item)
    backend = urlparse(options["--backend-store-uri"])
    assert backend.scheme.startswith("postgresql") and backend.hostname == "postgres" and backend.password is None
    assert options["--artifacts-destination"].startswith("s3://")
    env = mlflow["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert INTERPOLATION.fullmatch(env["PGPASSWORD"])["name"] == "POSTGRES_PASSWORD", "libpq reads PGPASSWORD"
    assert mlflow["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }
    assert str(mlflow["user"]).split(":")[0] not in {"0", "root"}


def test_auth_config_holds_no_password_and_its_database_is_created():
    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow" / "basic_auth.ini")
    assert not [key for key in ini["mlflow"] if "password" in key], "the admin password comes from the env file"
    database = urlparse(ini["mlflow"]["database_uri"])
    assert (database.hostname, database.path, database.password) == ("postgres", "/mlflow_auth", None)
    sql = (INFRA / "mlflow" / "initdb" / "10-mlflow-auth.sql").read_text(encoding="utf-8")
    assert "CREATE DATABASE mlflow_auth" in sql


def test_only_mlflow_is_published_and_by_default_on_loopback(compose):
    services = compose["services"]
    assert "ports" not in services["postgres"] and "ports" not in services["minio-init"]
    assert all(p.startswith("127.0.0.1:") for p in services["minio"]["ports"])
    (published,) = services["mlflow"]["ports"]
    bind = INTERPOLATION.match(published)
    assert bind and bind["name"] == "MLFLOW_BIND" and bind["arg"] == "127.0.0.1"


def test_bucket_setup_is_idempotent_and_reads_credentials_at_run_time(compose):
    script = compose["services"]["minio-init"]["command"][0]
    assert "mc mb --ignore-existing" in script
    assert "|| true" not in script, "a failed step must fail the one-shot service"
    # $$VAR reaches the shell as $VAR: the secrets are not baked into the command line by Compose.
    assert '"$$MINIO_ROOT_PASSWORD"' in script and "${MINIO_ROOT_PASSWORD" not in script
