"""`polysignal package-lambda`: a reproducible zip that runs the handler with nothing but the
Python standard library and boto3, as the Lambda runtime provides."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from polysignal.cli import main
from polysignal.serverless.package import LAMBDA_FILES

from support import UNIT

pytestmark = pytest.mark.timeout(60)

# A Lambda-like interpreter: no site-packages but boto3's own, the zip first on the path, and
# every other third-party module (orjson, aiohttp, ...) refused.
LAMBDA_RUN = r"""
import importlib.abc, json, os, sys
zip_path, site, endpoint_env = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
RUNTIME = {"boto3", "botocore", "jmespath", "s3transfer", "dateutil", "urllib3", "six"}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        root = name.split(".")[0]
        if root in sys.stdlib_module_names or root in RUNTIME or root == "polysignal":
            return None
        raise ModuleNotFoundError(f"not in the Lambda runtime: {name}")
sys.meta_path.insert(0, Refuse())
sys.path[:0] = [zip_path]
sys.path.append(site)
os.environ.update(endpoint_env)
import polysignal.serverless as serverless
assert serverless.__file__.startswith(zip_path), serverless.__file__
def event(route, cid, body=None):
    e = {"requestContext": {"routeKey": route, "connectionId": cid, "apiId": "a", "stage": "s"}}
    if body is not None:
        e["body"] = body
    return e
steps = [
    ("$connect", "b", None),
    ("$default", "b", '{"type":"subscribe","topics":["t"]}'),
    ("$default", "a", '{"type":"publish","topic":"t","data":"é"}'),
    ("$default", "a", '{"type":"ping","n":NaN}'),
]
statuses = [serverless.handler(event(*step), None)["statusCode"] for step in steps]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("orjson", "aiohttp"))
print(json.dumps({"statuses": statuses, "modules": loaded}))
"""


def test_zip_holds_exactly_the_handler_modules_and_is_reproducible(tmp_path, capsys):
    first, second = tmp_path / "a" / "lambda.zip", tmp_path / "b" / "lambda.zip"
    assert main(["package-lambda", "--out", str(first)]) == 0
    assert f"wrote {first}" in capsys.readouterr().out
    assert main(["package-lambda", "--out", str(second)]) == 0
    with zipfile.ZipFile(first) as zf:
        assert sorted(zf.namelist()) == sorted(LAMBDA_FILES)
        assert zf.testzip() is None
    assert first.read_bytes() == second.read_bytes()


def test_zip_runs_the_handler_without_orjson_or_aiohttp(tmp_path, lambda_env, management, items):
    """Subscribe and publish through the zipped handler in a Lambda-like interpreter."""
    out = tmp_path / "lambda.zip"
    assert main(["package-lambda", "--out", str(out)]) == 0
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            LAMBDA_RUN,
            str(out),
            sysconfig.get_paths()["purelib"],
            json.dumps({**lambda_env, "AWS_EC2_METADATA_DISABLED": "true"}),
        ],
        capture_output=True,
        text=True,
        timeout=30 * UNIT,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"statuses": [200, 200, 200, 200], "modules": []}
    assert management.frames("b") == [
        {
            "type": "publish",
            "topic": "t",
            "data": "é",
            "clients": 1,
            "_origin": "polysignal-serverless",
        }
    ]
    # The standard library's JSON refuses NaN as orjson does: an error frame, not a relay.
    (error,) = management.frames("a")
    assert error["type"] == "error" and error["message"].startswith("invalid JSON")
    assert [i["data"]["S"] for i in items()] == ["t"]
