"""The stricter check: the project's schema subset and manifests against the full upstream CRDs.

These tests exist only when ``CERT_AGENT_CRDS_DIR`` names a directory of the upstream CRD files
(conftest deselects them otherwise and says so in the summary); ``.ci/run`` sets it when CI lays
the upstream CRDs beside the checkout. See tests/crds.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.crds import (
    CERTIFICATE_REQUESTS,
    CRDS_DIR_SETTING,
    SCHEMA_DIR,
    SUBSETS,
    load_crd,
    render_subset,
    upstream_crds_dir,
)
from tests.fakekube import load_crd_resource

pytestmark = pytest.mark.upstream_crds


@pytest.fixture(scope="module")
def upstream() -> Path:
    directory = upstream_crds_dir()
    assert directory is not None, f"{CRDS_DIR_SETTING} is not set"
    missing = [name for name in sorted(SUBSETS) if not (directory / name).is_file()]
    assert not missing, f"{CRDS_DIR_SETTING}={directory} lacks {', '.join(missing)}"
    return directory


@pytest.mark.parametrize("filename", sorted(SUBSETS))
def test_schema_subset_is_what_the_upstream_crd_says(filename: str, upstream: Path) -> None:
    expected = render_subset(filename, upstream)
    assert (SCHEMA_DIR / filename).read_text() == expected, (
        f"tests/schemas/{filename} no longer matches the upstream CRD or the manifests: run "
        f"{CRDS_DIR_SETTING}={upstream} python -m tests.crds and review the diff"
    )


def test_fake_api_server_serves_the_upstream_certificaterequest_shape(upstream: Path) -> None:
    ours = load_crd_resource(CERTIFICATE_REQUESTS)
    theirs = load_crd_resource(CERTIFICATE_REQUESTS, upstream)
    assert (ours.group, ours.version, ours.plural, ours.kind, ours.status_subresource) == (
        theirs.group,
        theirs.version,
        theirs.plural,
        theirs.kind,
        theirs.status_subresource,
    )
    assert load_crd(CERTIFICATE_REQUESTS, upstream)["spec"]["scope"] == "Namespaced"


def test_deploy_objects_validate_against_the_full_upstream_crds(upstream: Path) -> None:
    from tests.test_deploy import DEPLOY, OVERLAY, check_prometheus_operator_objects, render

    check_prometheus_operator_objects(render(DEPLOY), render(OVERLAY), upstream)


def test_alert_rules_validate_against_the_full_upstream_crd(upstream: Path) -> None:
    from tests.test_alert_rules import RULE_FILE, check_against_crd, crd_schema

    [rule] = [d for d in yaml.safe_load_all(RULE_FILE.read_text()) if d]
    check_against_crd(rule, crd_schema(upstream))
