"""A local S3 server with real access keys: moto's server on 127.0.0.1, for the tests and the local cluster.

    python infra/local/s3_server.py [--port 0] [--bucket ssd] [--env-file s3.env]

moto's server mode accepts any request by default. Here every request must be signed with the access key
this script creates (SigV4, checked by moto's IAM emulation), so a wrong or missing key is refused with
403 as by a real object store:

- IAM is set up in-process before the socket opens (a user ``ssd-pipeline`` with an ``s3:*`` policy and one
  access key; moto generates the secret), then ``moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0`` makes moto
  check every request. There is no unauthenticated window, unlike seeding IAM over HTTP.
- moto's control API (``/moto-api/...``: reset the state, switch authentication off) answers 403: it takes
  no credentials, so anyone who can reach the port could otherwise turn the keys off. An unsigned request
  gets 403 ``AccessDenied`` before it reaches moto.

When the server listens, ``--env-file`` is written (mode 0600, replaced atomically so a reader never sees
half of it) with the variables a client needs, one ``KEY=value`` per line (``set -a; . FILE; set +a`` in a
shell, ``--env-file`` for docker)::

    AWS_ACCESS_KEY_ID  AWS_SECRET_ACCESS_KEY  AWS_ENDPOINT_URL  AWS_DEFAULT_REGION  SSD_S3_BUCKET

Without ``--env-file`` they are printed as ``export`` lines. Stop it with SIGTERM or SIGINT (by its PID).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

ACCOUNT_ID = "123456789012"  # moto's default account
USER_NAME = "ssd-pipeline"
REGION = "us-east-1"
POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
CONTROL_PREFIX = "/moto-api"


def _setup_iam_and_bucket(bucket: str) -> tuple[str, str]:
    """Create the IAM user, its policy and access key, and the bucket, in moto's in-memory backends."""
    from moto.iam.models import iam_backends
    from moto.s3.models import s3_backends

    iam = iam_backends[ACCOUNT_ID]["global"]
    iam.create_user(REGION, USER_NAME)
    iam.put_user_policy(USER_NAME, "s3-all", json.dumps(POLICY))
    key = iam.create_access_key(USER_NAME)
    if bucket:
        s3_backends[ACCOUNT_ID]["aws"].create_bucket(bucket, REGION)
    return key.access_key_id, key.secret_access_key


def _refuse(start_response: Any, code: str, message: str) -> list[bytes]:
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    start_response("403 Forbidden", [("Content-Type", "application/xml")])
    return [body.encode()]


def _guard(app: Any) -> Any:
    """WSGI middleware in front of moto: 403 for its control API and for any request without a signature
    (moto checks the signatures themselves; an unsigned request would reach some of its handlers as a 500)."""

    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO", "").startswith(CONTROL_PREFIX):
            return _refuse(start_response, "AccessDenied", "moto's control API is disabled on this server")
        signed = "HTTP_AUTHORIZATION" in environ or "X-Amz-Signature=" in environ.get("QUERY_STRING", "")
        if not signed:
            return _refuse(start_response, "AccessDenied", "Anonymous access is not allowed; sign the request")
        return app(environ, start_response)

    return wrapped


def client_env(endpoint: str, access_key: str, secret_key: str, bucket: str) -> dict[str, str]:
    """The environment a client (boto3, s3fs, the pipeline, dvc) needs to use this server."""
    return {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": REGION,
        "SSD_S3_BUCKET": bucket,
    }


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """``KEY=value`` lines, mode 0600, written to a temporary file in the same folder and renamed."""
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{k}={v}\n" for k, v in env.items()))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default)")
    parser.add_argument("--bucket", default="ssd", help="bucket to create ('' for none; default ssd)")
    parser.add_argument("--env-file", type=Path, help="write the client environment here once listening")
    args = parser.parse_args(argv)

    os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "false")
    from moto import settings
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    access_key, secret_key = _setup_iam_and_bucket(args.bucket)
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from the first request on, every request must be signed
    app = _guard(DomainDispatcherApplication(create_backend_app))
    server = make_server(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)
    endpoint = f"http://{args.host}:{server.server_port}"
    env = client_env(endpoint, access_key, secret_key, args.bucket)

    def _stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    if args.env_file:
        write_env_file(args.env_file, env)
        print(f"s3 server listening on {endpoint}, bucket {args.bucket!r}; env in {args.env_file}", flush=True)
    else:
        print("".join(f"export {k}={v}\n" for k, v in env.items()), end="", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
