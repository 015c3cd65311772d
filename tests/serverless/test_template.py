"""template.yaml: valid SAM; its table, routes, handler and permissions match the code."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

from polysignal.serverless.commands import DEFAULT_ZIP
from polysignal.serverless.settings import SERVERLESS_FIELDS
from polysignal.serverless.store import TABLE_DEFINITION, TTL_ATTRIBUTE
from serverless.awslocal import TEMPLATE, create_table_kwargs, table_resource

from support import require

pytestmark = pytest.mark.timeout(60)


def resources_of(template, kind):
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def test_cfn_lint_finds_no_problem():
    """cfn-lint (shipped with moto[server]) validates the SAM template offline."""
    require(importlib.util.find_spec("cfnlint") is not None, "cfn-lint is not installed")
    from cfnlint.api import ManualArgs, lint_file

    matches = lint_file(Path(TEMPLATE), config=ManualArgs(regions=["us-east-1"]))
    assert [str(m) for m in matches] == []


def test_table_matches_the_store(template):
    """The code's table definition (local --create-table) is the template's, key for key."""
    assert create_table_kwargs(template) == TABLE_DEFINITION
    ttl = table_resource(template)["TimeToLiveSpecification"]
    assert ttl == {"AttributeName": TTL_ATTRIBUTE, "Enabled": True}


def test_three_routes_reach_one_function(template):
    (api,) = resources_of(template, "AWS::ApiGatewayV2::Api").values()
    assert api["Properties"]["ProtocolType"] == "WEBSOCKET"
    assert api["Properties"]["RouteSelectionExpression"] == "$request.body.action"
    (integration_name,) = resources_of(template, "AWS::ApiGatewayV2::Integration")
    routes = resources_of(template, "AWS::ApiGatewayV2::Route").values()
    assert sorted(r["Properties"]["RouteKey"] for r in routes) == [
        "$connect",
        "$default",
        "$disconnect",
    ]
    for route in routes:
        assert route["Properties"]["Target"] == {"Sub": f"integrations/${{{integration_name}}}"}
    (function_name,) = resources_of(template, "AWS::Serverless::Function")
    uri = template["Resources"][integration_name]["Properties"]["IntegrationUri"]["Sub"]
    assert f"${{{function_name}.Arn}}" in uri


def test_function_handler_code_and_environment(template):
    (function,) = resources_of(template, "AWS::Serverless::Function").values()
    props = function["Properties"]
    module, _, attribute = props["Handler"].rpartition(".")
    assert callable(getattr(importlib.import_module(module), attribute))
    # `sam deploy` uploads what `polysignal package-lambda` writes by default.
    assert props["CodeUri"] == DEFAULT_ZIP
    assert props["Runtime"].startswith("python3.")
    (table_name,) = resources_of(template, "AWS::DynamoDB::Table")
    env = props["Environment"]["Variables"]
    assert env["TABLE_NAME"] == {"Ref": table_name}
    known = {spec.env for spec in SERVERLESS_FIELDS} | {"ECHO", "MAX_FRAME_BYTES"}
    assert set(env) <= known


def test_function_may_manage_connections_and_use_the_table(template):
    (function,) = resources_of(template, "AWS::Serverless::Function").values()
    policies = function["Properties"]["Policies"]
    (table_name,) = resources_of(template, "AWS::DynamoDB::Table")
    assert {"DynamoDBCrudPolicy": {"TableName": {"Ref": table_name}}} in policies
    statements = [s for p in policies if "Statement" in p for s in p["Statement"]]
    assert any(s["Action"] == "execute-api:ManageConnections" for s in statements)
    (permission,) = resources_of(template, "AWS::Lambda::Permission").values()
    assert permission["Properties"]["Principal"] == "apigateway.amazonaws.com"
