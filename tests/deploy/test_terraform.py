"""deploy/terraform, the serverless shape as a Terraform module, against template.yaml (SAM):
the same table (attributes and their types, keys, the gs1 index, the TTL attribute, billing),
the same routes, the same function (handler, runtime, architecture, memory, timeout, its
environment's names) and the permissions the function needs. Parsed with python-hcl2;
`terraform fmt -check` where terraform is installed (no registry the project's scripts use
provides it, and `terraform validate` would need the AWS provider downloaded)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from deploy.tools import DEPLOY
from serverless.awslocal import load_template, table_resource

from support import require

MODULE = DEPLOY / "terraform"


def unquote(value: Any) -> Any:
    """python-hcl2 8 keeps string literals' quotes (and keys' in labels): drop them."""
    if isinstance(value, str):
        return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    if isinstance(value, list):
        return [unquote(v) for v in value]
    if isinstance(value, dict):
        return {unquote(k): unquote(v) for k, v in value.items() if k != "__is_block__"}
    return value


def resources() -> dict[str, dict[str, Any]]:
    try:
        import hcl2
    except ImportError:
        require(False, "python-hcl2 is not installed: pip install python-hcl2 (the test extra)")
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(MODULE.glob("*.tf")):
        with path.open() as f:
            parsed = unquote(hcl2.load(f))
        for block in parsed.get("resource", []):
            for kind, named in block.items():
                for name, body in named.items():
                    found[f"{kind}.{name}"] = body
    return found


def one(blocks: Any) -> dict[str, Any]:
    assert isinstance(blocks, list) and len(blocks) == 1, blocks
    return blocks[0]


def test_table_matches_template():
    table = resources()["aws_dynamodb_table.subscriptions"]
    sam = table_resource(load_template())
    assert table["billing_mode"] == sam["BillingMode"]
    assert {(a["name"], a["type"]) for a in table["attribute"]} == {
        (a["AttributeName"], a["AttributeType"]) for a in sam["AttributeDefinitions"]
    }
    keys = {k["KeyType"]: k["AttributeName"] for k in sam["KeySchema"]}
    assert (table["hash_key"], table["range_key"]) == (keys["HASH"], keys.get("RANGE"))
    (sam_index,) = sam["GlobalSecondaryIndexes"]
    index = one(table["global_secondary_index"])
    index_keys = {k["KeyType"]: k["AttributeName"] for k in sam_index["KeySchema"]}
    assert index["name"] == sam_index["IndexName"] == "gs1"
    assert (index["hash_key"], index["range_key"]) == (index_keys["HASH"], index_keys["RANGE"])
    assert index["projection_type"] == sam_index["Projection"]["ProjectionType"]
    ttl = one(table["ttl"])
    assert ttl["attribute_name"] == sam["TimeToLiveSpecification"]["AttributeName"] == "ttl"
    assert ttl["enabled"] is sam["TimeToLiveSpecification"]["Enabled"] is True


def test_api_routes_and_function_match_template():
    found = resources()
    sam = load_template()["Resources"]
    routes = {r["Properties"]["RouteKey"] for r in sam.values() if r["Type"].endswith("::Route")}
    route = found["aws_apigatewayv2_route.signaling"]
    assert route["for_each"] == "${toset(local.route_keys)}"
    locals_text = (MODULE / "main.tf").read_text()
    assert 'route_keys = ["$connect", "$disconnect", "$default"]' in locals_text
    assert routes == {"$connect", "$disconnect", "$default"}
    api = found["aws_apigatewayv2_api.signaling"]
    (sam_api,) = [r["Properties"] for r in sam.values() if r["Type"] == "AWS::ApiGatewayV2::Api"]
    assert api["protocol_type"] == sam_api["ProtocolType"] == "WEBSOCKET"
    assert api["route_selection_expression"] == sam_api["RouteSelectionExpression"]
    assert found["aws_apigatewayv2_integration.signaling"]["integration_type"] == "AWS_PROXY"

    function = found["aws_lambda_function.signaling"]
    (sam_fn,) = [r["Properties"] for r in sam.values() if r["Type"] == "AWS::Serverless::Function"]
    assert function["handler"] == sam_fn["Handler"]
    assert function["runtime"] == sam_fn["Runtime"]
    assert function["architectures"] == sam_fn["Architectures"]
    assert function["memory_size"] == sam_fn["MemorySize"]
    assert function["timeout"] == sam_fn["Timeout"]
    variables = one(function["environment"])["variables"]
    assert set(variables) == set(sam_fn["Environment"]["Variables"])

    policy = found["aws_iam_role_policy.signaling"]["policy"]
    assert "execute-api:ManageConnections" in policy and "/POST/@connections/*" in policy
    assert "dynamodb:Query" in policy and "/index/*" in policy
    permission = found["aws_lambda_permission.api_gateway"]
    assert permission["principal"] == "apigateway.amazonaws.com"


def test_terraform_fmt():
    terraform = shutil.which("terraform")
    if terraform is None:
        # Not `require`: terraform comes from no registry the project's scripts install from.
        pytest.skip("terraform is not installed: `terraform fmt -check` not run")
    done = subprocess.run(
        [terraform, "fmt", "-check", "-diff", str(MODULE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_module_files():
    assert {p.name for p in Path(MODULE).glob("*.tf")} == {
        "main.tf",
        "variables.tf",
        "outputs.tf",
        "versions.tf",
    }
