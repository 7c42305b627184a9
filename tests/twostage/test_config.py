import argparse
from pathlib import Path

import pydantic
import pytest

from rerank_server.config import RerankSettings
from twostage.config import add_settings_flags, settings_from_args
from twostage.errors import ConfigError


def parse(argv):
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, RerankSettings)
    parser.add_argument("--settings-file")
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
    with pytest.raises(ConfigError, match="--max-batch-size / TWOSTAGE_RERANK_MAX_BATCH_SIZE = 'many'"):
        settings_from_args(RerankSettings, parse(["--max-batch-size", "many"]))
    with pytest.raises(pydantic.ValidationError):
        RerankSettings(provider="tpu")


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("TWOSTAGE_RERANK_PIPELINE_DEPTH", "0")
    with pytest.raises(ConfigError, match=r"TWOSTAGE_RERANK_PIPELINE_DEPTH = '0'.*greater than or equal to 1"):
        settings_from_args(RerankSettings, parse([]))


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        ("rerank", "pipeline_depth", "0"),
        ("rerank", "max_batch_tokens", "0"),
        ("rerank", "port", "70000"),
        ("rerank", "max_wait_ms", "-1"),
        ("recall", "max_k", "0"),
        ("gateway", "recall_budget_share", "0"),
        ("gateway", "fusion_alpha", "1.5"),
        ("gateway", "health_check_period_s", "0"),
    ],
)
def test_settings_are_range_checked_at_start(cls, field, value):
    from gateway.config import GatewaySettings
    from recall_server.config import RecallSettings

    settings_cls = {"rerank": RerankSettings, "recall": RecallSettings, "gateway": GatewaySettings}[cls]
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, settings_cls)
    with pytest.raises(ConfigError, match="--" + field.replace("_", "-")):
        settings_from_args(settings_cls, parser.parse_args(["--" + field.replace("_", "-"), value]))


@pytest.mark.parametrize("service", ["recall", "rerank", "gateway"])
def test_serve_help_works_for_every_service(service, capsys):
    from twostage.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", service, "--help"])
    assert exited.value.code == 0
    assert "--port" in capsys.readouterr().out


def test_every_field_has_a_description():
    from gateway.config import GatewaySettings
    from recall_server.config import RecallSettings

    for cls in (RerankSettings, RecallSettings, GatewaySettings):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} is undocumented"


def test_a_settings_file_sits_below_env_and_flags(tmp_path, monkeypatch):
    """What 'twostage eval --tune' writes: one file for every service, each reading its own lines."""
    from gateway.config import GatewaySettings

    path = tmp_path / "tuned.env"
    path.write_text("# tuned\nTWOSTAGE_RERANK_MAX_WAIT_MS=4\nexport TWOSTAGE_RERANK_MAX_BATCH_SIZE='16'\n\n"
                    "TWOSTAGE_GATEWAY_FUSION_ALPHA=0.4\n")
    settings = settings_from_args(RerankSettings, parse(["--settings-file", str(path)]))
    assert (settings.max_wait_ms, settings.max_batch_size) == (4.0, 16)
    monkeypatch.setenv("TWOSTAGE_RERANK_MAX_WAIT_MS", "6")
    assert settings_from_args(RerankSettings, parse(["--settings-file", str(path)])).max_wait_ms == 6.0
    assert settings_from_args(RerankSettings, parse(["--settings-file", str(path), "--max-wait-ms", "1"])
                              ).max_wait_ms == 1.0
    gateway = argparse.ArgumentParser()
    add_settings_flags(gateway, GatewaySettings)
    gateway.add_argument("--settings-file")
    assert settings_from_args(GatewaySettings, gateway.parse_args(["--settings-file", str(path)])).fusion_alpha == 0.4


def test_a_settings_file_with_a_typo_or_a_stray_line_is_refused(tmp_path):
    typo = tmp_path / "typo.env"
    typo.write_text("TWOSTAGE_RERANK_MAX_WAIT=4\n")
    with pytest.raises(ConfigError, match=r"line 1: TWOSTAGE_RERANK_MAX_WAIT is no setting of RerankSettings"):
        settings_from_args(RerankSettings, parse(["--settings-file", str(typo)]))
    stray = tmp_path / "stray.env"
    stray.write_text("TWOSTAGE_RERANK_MAX_WAIT_MS=4\nfusion_alpha 0.4\n")
    with pytest.raises(ConfigError, match=r"line 2: expected TWOSTAGE_..._NAME=VALUE"):
        settings_from_args(RerankSettings, parse(["--settings-file", str(stray)]))
    bad = tmp_path / "bad.env"
    bad.write_text("TWOSTAGE_RERANK_MAX_WAIT_MS=-1\n")
    with pytest.raises(ConfigError, match=r"--max-wait-ms / TWOSTAGE_RERANK_MAX_WAIT_MS = '-1' \(settings file .*bad.env, line 1\)"):
        settings_from_args(RerankSettings, parse(["--settings-file", str(bad)]))
    with pytest.raises(ConfigError, match="settings file .*missing.env"):
        settings_from_args(RerankSettings, parse(["--settings-file", str(tmp_path / "missing.env")]))


def test_serve_all_hands_its_settings_file_to_every_process(tmp_path):
    from twostage.stack import Stack

    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "index.json").write_text("{}")
    stack = Stack("127.0.0.1", 1, str(tmp_path / "index"), settings_file="tuned.env")
    stages, gateway = stack._security_flags()
    expected = ["--settings-file", str((Path.cwd() / "tuned.env").resolve())]
    assert stages == gateway == expected


def test_a_settings_file_names_the_line_of_a_mistake_no_service_would_catch(tmp_path):
    """A service prefix misspelt would be read by no service; a name twice, one value silently lost; a bad value
    is traced to its line; and serve all / eval check every service's lines before starting anything."""
    from twostage.cli.config import check_settings_file

    cases = {
        "TWOSTAGE_RECAL_PRF_DEPTH=3\n": r"line 1: TWOSTAGE_RECAL_PRF_DEPTH is under no service's prefix",
        "TWOSTAGE_LOG_LEVEL=DEBUG\n": r"line 1: TWOSTAGE_LOG_LEVEL is under no service's prefix",
        "TWOSTAGE_RERANK_MAX_WAIT_MS=4\n# again\nTWOSTAGE_RERANK_MAX_WAIT_MS=5\n":
            r"line 3: TWOSTAGE_RERANK_MAX_WAIT_MS is set again \(first on line 1\)",
    }
    for number, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"case{number}.env"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            settings_from_args(RerankSettings, parse(["--settings-file", str(path)]))
    bad = tmp_path / "bad.env"
    bad.write_text("TWOSTAGE_RERANK_MAX_WAIT_MS=2\nTWOSTAGE_GATEWAY_FUSION_ALPHA=1.5\n")
    assert settings_from_args(RerankSettings, parse(["--settings-file", str(bad)])).max_wait_ms == 2.0
    with pytest.raises(ConfigError, match=r"TWOSTAGE_GATEWAY_FUSION_ALPHA = '1.5' \(settings file .*bad.env, line 2\)"):
        check_settings_file(bad)  # the gateway's line, caught before any process starts
    binary = tmp_path / "binary.env"
    binary.write_bytes(b"\xff\xfe\x00TWOSTAGE")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        settings_from_args(RerankSettings, parse(["--settings-file", str(binary)]))


def test_the_services_prefixes_are_their_settings_prefixes():
    from twostage.cli.config import settings_classes
    from twostage.config import SERVICE_PREFIXES

    assert sorted(SERVICE_PREFIXES) == sorted(cls.model_config["env_prefix"] for cls in settings_classes().values())
