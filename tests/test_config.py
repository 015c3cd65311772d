"""Settings from the environment and flags, and the configuration page kept in step."""

from __future__ import annotations

import dataclasses

import pytest

from polysignal.cli import build_parser
from polysignal.config import (
    FIELDS,
    GROUPS,
    ConfigError,
    Secret,
    Settings,
    config_table,
    redact_url,
)

from support import ROOT


def test_defaults_match_the_originals():
    s = Settings.from_env({})
    server = s.server
    assert (server.port, server.backend_url, s.redis.signal_channel, s.limits.max_frame_bytes) == (
        4444,
        "memory://",
        "signal:publish",
        65536,
    )
    assert len(server.node_id) == 36


def test_env_and_flag_precedence():
    s = Settings.from_env({"PORT": "5000", "ECHO": "1"}, port=6000)
    assert s.server.port == 6000 and s.topics.echo is True


def test_redis_url_alone_selects_redis():
    alone = Settings.from_env({"REDIS_URL": "redis://h:1/0"})
    assert alone.server.backend_url == "redis://h:1/0"
    both = Settings.from_env({"REDIS_URL": "redis://h:1/0", "BACKEND": "memory://"})
    assert both.server.backend_url == "memory://"


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
        ({"ID_LEASE_TTL": "0"}, "ID_LEASE_TTL"),
        ({"MAX_HEADERS": "0"}, "MAX_HEADERS"),
    ],
)
def test_bad_values_fail_loudly(env, needle):
    with pytest.raises(ConfigError, match=needle):
        Settings.from_env(env)


def test_the_largest_relay_frame_must_fit_a_held_socket_with_its_cost():
    """A held frame counts its payload plus 128 bytes: the largest must fit, exactly."""
    fits = {"RELAY_BUFFER_BYTES": "1048576", "RELAY_MAX_FRAME_BYTES": str(1048576 - 128)}
    assert Settings.from_env(fits).relay.relay_max_frame_bytes == 1048576 - 128
    over = {**fits, "RELAY_MAX_FRAME_BYTES": str(1048576 - 127)}
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(over)
    assert str(refused.value) == (
        "RELAY_MAX_FRAME_BYTES: must leave 128 bytes of RELAY_BUFFER_BYTES (a held frame counts "
        "its payload plus 128) and not exceed SEND_BUFFER_BYTES, or one frame would overflow the "
        "buffers that hold it"
    )
    beyond_send = {"SEND_BUFFER_BYTES": "65536", "RELAY_MAX_FRAME_BYTES": "65537"}
    with pytest.raises(ConfigError):
        Settings.from_env({**beyond_send, "RELAY_BUFFER_BYTES": "1048576"})
    beyond_send["RELAY_MAX_FRAME_BYTES"] = "65536"
    assert Settings.from_env(beyond_send).relay.relay_max_frame_bytes == 65536


def test_ice_servers_accepts_list_or_configuration():
    servers = '[{"urls":"stun:127.0.0.1:3478"}]'
    assert Settings.from_env({"ICE_SERVERS": servers}).server.ice_servers == (
        {"urls": "stun:127.0.0.1:3478"},
    )
    wrapped = '{"iceServers":' + servers + "}"
    assert Settings.from_env({"ICE_SERVERS": wrapped}).server.ice_servers == (
        {"urls": "stun:127.0.0.1:3478"},
    )


def test_secrets_never_print():
    s = Settings.from_env({"APP_SECRET": "hunter2", "APP_PASS": "pw"})
    assert "hunter2" not in repr(s) and "pw'" not in repr(s)
    assert s.rooms.app_secret.reveal() == "hunter2"
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


def test_each_setting_is_declared_once_and_names_are_unique():
    """One declaration per setting: names and variables are unique across the groups, and each
    group holds exactly the fields it declares."""
    names = [spec.name for spec in FIELDS]
    envs = [spec.env for spec in FIELDS]
    assert len(names) == len(set(names)) and len(envs) == len(set(envs))
    for name, group in GROUPS:
        declared = {spec.name for spec in FIELDS if spec.group == name}
        assert declared == {f.name for f in dataclasses.fields(group)}


def test_replace_and_of_name_fields_without_their_group():
    s = Settings.of(max_frame_bytes=2048, echo=True, relay_max_documents=3)
    assert (s.limits.max_frame_bytes, s.topics.echo, s.relay.relay_max_documents) == (2048, True, 3)
    assert s.replace(port=0).server.port == 0 and s.server.port == 4444
    with pytest.raises(TypeError, match="unknown setting 'nope'"):
        s.replace(nope=1)


def test_one_meaning_per_name():
    """Topics per connection, documents per relay peer and rooms per socket are separate."""
    s = Settings.from_env(
        {"MAX_TOPICS_PER_CONNECTION": "5", "RELAY_MAX_DOCUMENTS": "6", "ROOMS_MAX_PER_SOCKET": "7"}
    )
    assert (
        s.topics.max_topics_per_connection,
        s.relay.relay_max_documents,
        s.rooms.rooms_max_per_socket,
    ) == (5, 6, 7)
