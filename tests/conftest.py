"""Fixtures shared by every test package: the S3 server (``object_store``, ``s3_env``; see tests/object_store.py)."""

pytest_plugins = ("tests.object_store",)
