"""The Lambda handler fed arbitrary API Gateway events (hypothesis): it answers every one with
200 or 400, never raises and never logs an error, whatever the event's shape."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serverless.awslocal import ws_event

pytestmark = pytest.mark.timeout(120)

# Integers within 64 bits: orjson (which writes the bodies) refuses larger ones.
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=12)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
routes = st.sampled_from(["$connect", "$disconnect", "$default"]) | values
bodies = (
    st.none()
    | st.text(max_size=80)
    | st.fixed_dictionaries(
        {"type": st.sampled_from(["subscribe", "unsubscribe", "publish", "ping"]) | values},
        optional={
            "topics": values | st.lists(st.text(max_size=6)),
            "topic": values,
            "data": values,
        },
    ).map(lambda m: orjson.dumps(m).decode())
)


@st.composite
def events(draw: st.DrawFn) -> Any:
    """Real event shapes with parts replaced or dropped, or anything at all."""
    event = ws_event(draw(st.sampled_from(["$connect", "$disconnect", "$default"])), "fz", None)
    event["body"] = draw(bodies)
    context = event["requestContext"]
    for key in draw(st.sets(st.sampled_from(sorted(context)), max_size=3)):
        if draw(st.booleans()):
            del context[key]
        else:
            context[key] = draw(values)
    if draw(st.booleans()):
        context["routeKey"] = draw(routes)
    if draw(st.booleans()):
        event["isBase64Encoded"] = draw(values)
    return draw(st.just(event) | values)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(event=events())
def test_any_event_is_answered_200_or_400(handler, caplog, event):
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="polysignal"):
        result = handler(event)
    assert result["statusCode"] in (200, 400), result
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
