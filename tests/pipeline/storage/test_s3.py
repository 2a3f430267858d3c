"""pipeline.storage.s3: the client's bounds, and one client per environment."""

from __future__ import annotations

import os

from pipeline.storage import s3


def test_the_client_is_bounded():
    fs = s3.s3_filesystem("http://127.0.0.1:1")
    assert fs.retries == s3.S3FS_RETRIES < 5  # s3fs's own default is 5 attempts with back-off
    config = fs.config_kwargs
    assert config["connect_timeout"] == s3.CONNECT_TIMEOUT_S <= 5
    assert config["retries"] == {"max_attempts": s3.MAX_ATTEMPTS, "mode": "standard"}
    assert fs.endpoint_url == "http://127.0.0.1:1"
    assert not fs.dircache.use_listings_cache


def test_the_preflight_client_tries_twice_and_is_kept_apart():
    quick = s3.s3_filesystem("http://127.0.0.1:1", attempts=2)
    assert quick.config_kwargs["retries"]["max_attempts"] == 2
    assert s3.s3_filesystem("http://127.0.0.1:1") is not quick


def test_one_client_per_endpoint_and_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAONE")
    one = s3.s3_filesystem("http://127.0.0.1:1")
    assert s3.s3_filesystem("http://127.0.0.1:1") is one
    assert s3.s3_filesystem("http://127.0.0.1:2") is not one
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATWO")
    assert s3.s3_filesystem("http://127.0.0.1:1") is not one
    monkeypatch.setenv("AWS_PROFILE", "other")
    assert len({id(s3.s3_filesystem("http://127.0.0.1:1")), id(one)}) == 2
    assert all(key[2] == os.getpid() for key in s3._cache)  # a forked loader worker builds its own
