"""``models:/`` URIs: the two accepted forms, and a clear error for anything else or an unknown model.
Downloading a registered model's file from a server: tests/pipeline/serving/test_publish.py."""

from __future__ import annotations

import pytest

from pipeline.config import TrackingConfig
from pipeline.serving.model_uri import check_model_uri, download_model_file, is_model_uri
from pipeline.tracking.uris import TrackingError


def test_the_two_forms():
    assert check_model_uri("models:/ssd@champion") == ("ssd", "champion", None)
    assert check_model_uri("models:/my-ssd/12") == ("my-ssd", None, "12")
    assert is_model_uri("models:/ssd@champion") and not is_model_uri("models/ssd.pt")


@pytest.mark.parametrize("bad", ["models:/ssd", "models:/ssd@", "models:/ssd/latest", "models:/a/b/1", "models:/@x"])
def test_other_forms_are_refused_with_the_accepted_ones_named(bad):
    with pytest.raises(ValueError, match="expected models:/NAME@ALIAS or models:/NAME/VERSION"):
        check_model_uri(bad)


@pytest.mark.slow
def test_an_unknown_model_is_a_tracking_error_naming_the_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(TrackingError, match="models:/nobody@champion"):
        download_model_file("models:/nobody@champion", cfg, tmp_path)
