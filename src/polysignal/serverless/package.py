"""``polysignal package-lambda``: the deployment zip of the Lambda handler.

The zip holds only the pure-Python modules the handler imports; the Lambda Python runtime ships
boto3, and the topics codec falls back to the standard library's JSON where orjson is absent
(``polysignal.protocols.jsonwire``), so the same zip runs on x86_64 and arm64 and on every
supported Python. Entries are sorted and dated 1980-01-01, so the same code gives the same bytes.

The SAM template (``template.yaml``) ships in the package too, so an installed polysignal can
deploy without a checkout: ``write_template`` writes it beside the zip with its ``CodeUri``
naming that zip.
"""

from __future__ import annotations

import os
import zipfile
from importlib import resources
from pathlib import Path

import polysignal

# Everything `polysignal.serverless.handler` imports, relative to the package's parent directory.
LAMBDA_FILES: tuple[str, ...] = (
    "polysignal/__init__.py",
    "polysignal/config.py",
    "polysignal/core/__init__.py",
    "polysignal/core/errors.py",
    "polysignal/core/topics.py",
    "polysignal/protocols/__init__.py",
    "polysignal/protocols/jsonwire.py",
    "polysignal/protocols/topics.py",
    "polysignal/serverless/__init__.py",
    "polysignal/serverless/aws.py",
    "polysignal/serverless/sender.py",
    "polysignal/serverless/service.py",
    "polysignal/serverless/settings.py",
    "polysignal/serverless/store.py",
    "polysignal/throttle.py",
)

_EPOCH = (1980, 1, 1, 0, 0, 0)


def build_zip(out: Path) -> list[str]:
    """Write the deployment zip to ``out`` (parents created); return its entry names."""
    root = Path(polysignal.__file__).resolve().parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(LAMBDA_FILES)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, (root / name).read_bytes())
    tmp.replace(out)
    return names


# The template's code location as the checkout has it (template.yaml at the root, the zip in dist/).
TEMPLATE_CODE_URI = "CodeUri: dist/lambda.zip"


def template_text() -> str:
    """The SAM template shipped in the package (``polysignal/serverless/template.yaml``)."""
    return resources.files("polysignal.serverless").joinpath("template.yaml").read_text("utf-8")


def write_template(zip_path: Path, out: Path | None = None) -> Path:
    """Write the SAM template to ``out`` (default: ``template.yaml`` beside ``zip_path``), its
    ``CodeUri`` the zip's path relative to the template's directory; return where it went."""
    out = out if out is not None else zip_path.with_name("template.yaml")
    text = template_text()
    if text.count(TEMPLATE_CODE_URI) != 1:  # pragma: no cover - guards an edit of the template
        raise RuntimeError(f"template.yaml must say {TEMPLATE_CODE_URI!r} exactly once")
    code_uri = Path(os.path.relpath(zip_path.resolve(), out.resolve().parent)).as_posix()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.replace(TEMPLATE_CODE_URI, f"CodeUri: {code_uri}"), "utf-8")
    return out
