import argparse

import pydantic
import pytest

from rerank_server.config import RerankSettings
from twostage.config import add_settings_flags, settings_from_args


def parse(argv):
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, RerankSettings)
    return parser.parse_args(argv)


def test_flag_beats_env_beats_default(monkeypatch):
    assert RerankSettings().max_wait_ms == RerankSettings.model_fields["max_wait_ms"].default
    monkeypatch.setenv("TWOSTAGE_RERANK_MAX_WAIT_MS", "7.5")
    assert RerankSettings().max_wait_ms == 7.5
    assert settings_from_args(RerankSettings, parse(["--max-wait-ms", "3"])).max_wait_ms == 3.0
    assert settings_from_args(RerankSettings, parse([])).max_wait_ms == 7.5


def test_settings_are_frozen_and_validated():
    settings = RerankSettings()
    with pytest.raises(pydantic.ValidationError):
        settings.max_wait_ms = 1  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        settings_from_args(RerankSettings, parse(["--max-batch-size", "many"]))
    with pytest.raises(pydantic.ValidationError):
        RerankSettings(provider="tpu")


def test_every_field_has_a_description():
    from gateway.config import GatewaySettings
    from recall_server.config import RecallSettings

    for cls in (RerankSettings, RecallSettings, GatewaySettings):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} is undocumented"
