"""Conditional writes on local disk and on a real S3 server (moto, real keys): create-if-absent, replace and
delete only if unchanged, and of many concurrent writers exactly one wins."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time

import pytest

from pipeline.training.lease_store import LocalStore, S3Store, VersionConflict, open_store

RACERS = 6


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs" / "ssd-0badf00d.lease")
    return request.getfixturevalue("s3_env").fresh_url("runs", "ssd-0badf00d.lease")


def test_the_right_store_is_picked(tmp_path, s3_env):
    assert isinstance(open_store(str(tmp_path / "x.lease")), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}/x.lease"), LocalStore)
    assert isinstance(open_store(s3_env.fresh_url("x.lease")), S3Store)


def test_create_only_when_absent(uri):
    store = open_store(uri)
    assert store.read() is None
    version = store.create(b"one")
    assert store.read() == (b"one", version)
    with pytest.raises(VersionConflict):
        store.create(b"two")
    assert store.read().data == b"one"


def test_replace_and_delete_only_the_version_read(uri):
    store = open_store(uri)
    first = store.create(b"one")
    second = store.replace(b"two", first)
    assert second != first and store.read() == (b"two", second)
    with pytest.raises(VersionConflict):
        store.replace(b"three", first)  # a writer holding the old version loses
    with pytest.raises(VersionConflict):
        store.delete(first)
    assert store.read().data == b"two"
    store.delete(second)
    assert store.read() is None
    with pytest.raises(VersionConflict):
        store.delete(second)  # already gone
    with pytest.raises(VersionConflict):
        store.replace(b"four", second)  # a replace never re-creates a deleted object


_STORES: dict[str, object] = {}  # per process: racers reuse a warm client, so they start together


def _store(uri: str):
    if uri not in _STORES:
        _STORES[uri] = open_store(uri)
        _STORES[uri].read()  # the first request sets up the client: not part of the race
    return _STORES[uri]


def _create_at(uri: str, start: float, data: bytes) -> bool:
    store = _store(uri)
    time.sleep(max(0.0, start - time.time()))
    try:
        store.create(data)
    except VersionConflict:
        return False
    return True


def _replace_at(uri: str, start: float, data: bytes, version: str) -> bool:
    store = _store(uri)
    time.sleep(max(0.0, start - time.time()))
    try:
        store.replace(data, version)
    except VersionConflict:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize(
    ("uri", "pool"), [("local", "threads"), ("local", "processes"), ("s3", "threads")], indirect=["uri"]
)
def test_concurrent_writers_exactly_one_wins(uri, pool):
    """RACERS writers released at the same instant; the object ends as the one winner wrote it. Locally the
    writers are threads or processes (the flock must hold across both); S3 decides on the server, where
    client threads are as concurrent as client processes."""
    if pool == "threads":
        executor = concurrent.futures.ThreadPoolExecutor(RACERS)
        _STORES.clear()  # each thread's store is its own object: the tasks get fresh ones
    else:
        executor = concurrent.futures.ProcessPoolExecutor(RACERS, mp_context=multiprocessing.get_context("spawn"))
    lead_s = 10.0 if pool == "processes" else 2.0  # the first round: interpreters and clients start up
    store = open_store(uri)
    with executor:
        for round_ in range(2):
            start = time.time() + lead_s
            datas = [b"c%d" % i for i in range(RACERS)]
            created = list(executor.map(_create_at, [uri] * RACERS, [start] * RACERS, datas))
            assert sum(created) == 1, f"round {round_}: {sum(created)} creators won"
            current = store.read()
            assert current.data == datas[created.index(True)]
            start = time.time() + 0.5
            datas = [b"r%d" % i for i in range(RACERS)]
            replaced = list(
                executor.map(_replace_at, [uri] * RACERS, [start] * RACERS, datas, [current.version] * RACERS)
            )
            assert sum(replaced) == 1, f"round {round_}: {sum(replaced)} replacers won"
            final = store.read()
            assert final.data == datas[replaced.index(True)]
            store.delete(final.version)
            lead_s = 0.5
