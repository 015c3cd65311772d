"""Where a token is read from (server/auth.py), on any input a client can send: the path
prefix, the query, ``Authorization`` and ``Cookie`` never raise, and what they give is the
client's own text."""

from __future__ import annotations

from urllib.parse import parse_qsl

from hypothesis import given
from hypothesis import strategies as st

from polysignal.server.auth import query_without_token, split_token_path, token_of

HEADER = st.text(alphabet=st.characters(codec="latin-1"), max_size=120)


@given(HEADER)
def test_any_path_splits_into_a_path_and_a_token_it_held(path):
    rest, token = split_token_path(path)
    assert rest.startswith("/") or rest == path
    if token is None:
        assert rest == path or path.startswith("/token/")
    else:
        assert path.startswith(f"/token/{token}") and "/" not in token


def test_the_token_path_prefix():
    assert split_token_path("/token/abc/introduction/x") == ("/introduction/x", "abc")
    assert split_token_path("/token/abc") == ("/", "abc")
    assert split_token_path("/token//x") == ("/x", None)
    assert split_token_path("/tokens/abc") == ("/tokens/abc", None)


@given(st.dictionaries(HEADER, HEADER, max_size=4), HEADER | st.none(), HEADER | st.none())
def test_any_query_header_or_cookie_gives_a_token_from_them_or_none(query, authorization, cookie):
    token = token_of(query, authorization, cookie, "polysignal_token")
    assert (
        token is None
        or token == query.get("token")
        or token in (authorization or "")
        or (token in (cookie or ""))
    )


def test_where_a_token_is_read_first():
    assert token_of({"token": "q"}, "Bearer h", "polysignal_token=c", "polysignal_token") == "q"
    assert token_of({}, "bearer  h ", "polysignal_token=c", "polysignal_token") == "h"
    assert token_of({}, "Basic h", "polysignal_token=c", "polysignal_token") == "c"
    assert token_of({}, "Bearer ", 'polysignal_token="', "polysignal_token") is None


@given(HEADER)
def test_any_query_loses_only_its_token(query):
    shown = query_without_token(query)
    kept = parse_qsl(query, keep_blank_values=True)
    assert parse_qsl(shown, keep_blank_values=True) == [(k, v) for k, v in kept if k != "token"]
