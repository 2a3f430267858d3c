"""infra/local/s3_server.py through the tests' fixture: only requests signed with its key get in."""

from __future__ import annotations

import os
import stat
import urllib.error
import urllib.request

import botocore.exceptions
import pytest

from tests.object_store import S3Server


def _status(url: str, method: str = "GET") -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_a_signed_request_works_and_an_unsigned_one_is_refused(object_store):
    client = object_store.client()
    key = object_store.fresh_url("hello.txt").split("/", 3)[3]
    client.put_object(Bucket=object_store.bucket, Key=key, Body=b"hello")
    assert client.get_object(Bucket=object_store.bucket, Key=key)["Body"].read() == b"hello"
    # the same object without a signature: what anyone who can reach the port would get
    assert _status(f"{object_store.endpoint}/{object_store.bucket}/{key}") == 403
    assert _status(f"{object_store.endpoint}/{object_store.bucket}?list-type=2") == 403


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"aws_secret_access_key": "not-the-secret"}, "SignatureDoesNotMatch"),
        ({"aws_access_key_id": "AKIAUNKNOWNKEY000000"}, "InvalidAccessKeyId"),
    ],
)
def test_a_wrong_key_is_refused(object_store, overrides, code):
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        object_store.client(**overrides).list_objects_v2(Bucket=object_store.bucket)
    assert caught.value.response["Error"]["Code"] == code


def test_the_control_api_that_could_switch_keys_off_is_closed(object_store):
    assert _status(f"{object_store.endpoint}/moto-api/reset-auth", method="POST") == 403
    assert _status(f"{object_store.endpoint}/moto-api/reset", method="POST") == 403
    # still refusing unsigned requests afterwards
    assert _status(f"{object_store.endpoint}/{object_store.bucket}?list-type=2") == 403


def test_the_env_file_is_private_and_s3_env_sets_it(s3_env):
    mode = stat.S_IMODE(os.stat(s3_env.env_file).st_mode)
    assert mode & 0o077 == 0, oct(mode)
    assert os.environ["AWS_ENDPOINT_URL"] == s3_env.endpoint.rstrip("/")
    assert os.environ["AWS_ACCESS_KEY_ID"] == s3_env.access_key
    assert s3_env.endpoint.startswith("http://127.0.0.1:")
    import boto3  # a default client takes everything from the environment

    assert boto3.client("s3").head_bucket(Bucket=s3_env.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_stop_ends_the_server_by_its_pid(tmp_path):
    server = S3Server(tmp_path, bucket="other").start()
    pid = server.pid
    assert server.client().head_bucket(Bucket="other")["ResponseMetadata"]["HTTPStatusCode"] == 200
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.endpoint}/other", timeout=2)
