"""Settings from the environment and flags, and the configuration page kept in step."""

from __future__ import annotations

import pytest

from polysignal.cli import build_parser
from polysignal.config import ConfigError, Secret, Settings, config_table, redact_url

from support import ROOT


def test_defaults_match_the_originals():
    s = Settings.from_env({})
    assert (s.port, s.backend_url, s.signal_channel, s.max_frame_bytes) == (
        4444,
        "memory://",
        "signal:publish",
        65536,
    )
    assert len(s.node_id) == 36


def test_env_and_flag_precedence():
    s = Settings.from_env({"PORT": "5000", "ECHO": "1"}, port=6000)
    assert s.port == 6000 and s.echo is True


def test_redis_url_alone_selects_redis():
    assert Settings.from_env({"REDIS_URL": "redis://h:1/0"}).backend_url == "redis://h:1/0"
    both = Settings.from_env({"REDIS_URL": "redis://h:1/0", "BACKEND": "memory://"})
    assert both.backend_url == "memory://"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"PORT": "abc"}, "PORT"),
        ({"ECHO": "maybe"}, "ECHO"),
        ({"BACKEND": "kafka://x"}, "BACKEND"),
        ({"RATE_LIMIT": "-1"}, "RATE_LIMIT"),
        ({"ICE_SERVERS": "{"}, "ICE_SERVERS"),
        ({"WORKERS": "2"}, "--workers"),
        ({"RELAY_MAX_FRAME_BYTES": "2000000"}, "RELAY_MAX_FRAME_BYTES"),
    ],
)
def test_bad_values_fail_loudly(env, needle):
    with pytest.raises(ConfigError, match=needle):
        Settings.from_env(env)


def test_ice_servers_accepts_list_or_configuration():
    servers = '[{"urls":"stun:127.0.0.1:3478"}]'
    assert Settings.from_env({"ICE_SERVERS": servers}).ice_servers == (
        {"urls": "stun:127.0.0.1:3478"},
    )
    wrapped = '{"iceServers":' + servers + "}"
    assert Settings.from_env({"ICE_SERVERS": wrapped}).ice_servers == (
        {"urls": "stun:127.0.0.1:3478"},
    )


def test_secrets_never_print():
    s = Settings.from_env({"APP_SECRET": "hunter2", "APP_PASS": "pw"})
    assert "hunter2" not in repr(s) and "pw'" not in repr(s)
    assert s.app_secret.reveal() == "hunter2"
    assert str(Secret("x")) == "Secret('**********')"


def test_redact_url_strips_password():
    assert redact_url("redis://u:secret@h:6379/0") == "redis://u:***@h:6379/0"
    assert redact_url("redis://h:6379") == "redis://h:6379"


def test_every_setting_is_a_flag():
    args = build_parser().parse_args(["serve", "--max-frame-bytes", "2048", "--echo"])
    assert args.max_frame_bytes == "2048" and args.echo is True


def test_configuration_page_is_generated_from_the_code():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == config_table(), "run: polysignal config-table > docs/configuration.md"
