"""deploy/base/prometheusrule.yaml: a valid PrometheusRule whose alerts fire when they should.

spec.groups is the single source: it is written to a temporary rules file next to a copy of
tests/promtool/alerts_test.yaml, and promtool checks and unit-tests it there.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import generate_latest

from agent.observe.metrics import AgentMetrics
from tests.crds import SCHEMA_DIR, schema_for

REPO = Path(__file__).resolve().parents[1]
RULE_FILE = REPO / "deploy" / "base" / "prometheusrule.yaml"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool" / "alerts_test.yaml"

ALERTS = {
    "CertAgentCertificateNotRenewed",
    "CertAgentRenewalsFailing",
    "CertAgentDown",
    "CertAgentCAExpiringSoon",
    "CertAgentNodeCANotRenewed",
    "CertAgentTmpfsAlmostFull",
    "CertAgentPolicyReloadFailed",
}


@pytest.fixture(scope="module")
def rule() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(RULE_FILE.read_text()) if d]
    assert len(docs) == 1
    return dict(docs[0])


def alert_rules(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r]


# --------------------------------------------------------------------------- CRD schema


def crd_schema(directory: Path = SCHEMA_DIR) -> dict[str, Any]:
    """PrometheusRule's schema: the project's subset, or the upstream CRD in ``directory``."""
    return schema_for("PrometheusRule", "monitoring.coreos.com/v1", directory)


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def schema_errors(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """The structural-schema subset the CRD uses, plus the fields the API server would prune."""
    errors: list[str] = []
    if "anyOf" in schema or schema.get("x-kubernetes-int-or-string"):
        if not isinstance(obj, int | str) or isinstance(obj, bool):
            errors.append(f"{path}: must be an integer or a string")
        return errors
    expected = schema.get("type")
    wrong_type = expected is not None and (
        not isinstance(obj, _TYPES[expected]) or (isinstance(obj, bool) and expected != "boolean")
    )
    if wrong_type:
        return [f"{path}: must be {expected}, got {type(obj).__name__}"]
    if "enum" in schema and obj not in schema["enum"]:
        errors.append(f"{path}: {obj!r} not in {schema['enum']}")
    if isinstance(obj, str):
        if len(obj) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than {schema['minLength']}")
        if "pattern" in schema:
            # Go's RE2 allows a flag group after "^"; Python wants it first.
            pattern = schema["pattern"].replace("^(?i)", "(?i)^")
            if not re.search(pattern, obj):
                errors.append(f"{path}: {obj!r} does not match {schema['pattern']}")
    if isinstance(obj, dict):
        for key in schema.get("required", []):
            if key not in obj:
                errors.append(f"{path}.{key}: required")
        properties = schema.get("properties")
        for key, value in obj.items():
            if properties is not None and key in properties:
                errors += schema_errors(value, properties[key], f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(value, schema["additionalProperties"], f"{path}.{key}")
            elif properties is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{key}: unknown field (the API server would drop it)")
    if isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
        keys = schema.get("x-kubernetes-list-map-keys")
        if keys:
            seen = [tuple(item.get(k) for k in keys) for item in obj]
            if len(seen) != len(set(seen)):
                errors.append(f"{path}: duplicate {keys}")
    return errors


def check_against_crd(rule: dict[str, Any], schema: dict[str, Any]) -> None:
    assert schema_errors(rule, schema) == []
    jsonschema.Draft7Validator(schema).validate(rule)  # a second opinion on types and enums


def test_validates_against_the_prometheusrule_crd(rule: dict[str, Any]) -> None:
    check_against_crd(rule, crd_schema())


def test_schema_check_catches_mistakes(rule: dict[str, Any]) -> None:
    schema = crd_schema()
    bad = yaml.safe_load(yaml.safe_dump(rule))
    first = bad["spec"]["groups"][0]["rules"][0]
    first["annotation"] = first.pop("annotations")  # a typo the API server would silently drop
    first["for"] = "5 minutes"
    first["labels"]["severity"] = 2
    del bad["spec"]["groups"][0]["rules"][1]["expr"]
    bad["spec"]["groups"].append({"name": "cert-agent", "rules": []})
    errors = schema_errors(bad, schema)
    assert ".spec.groups[0].rules[0].annotation: unknown field (the API server would drop it)" in (
        errors
    )
    assert any(e.startswith(".spec.groups[0].rules[0].for:") for e in errors)
    assert ".spec.groups[0].rules[0].labels.severity: must be string, got int" in errors
    assert ".spec.groups[0].rules[1].expr: required" in errors
    assert ".spec.groups: duplicate ['name']" in errors


def test_object_identity(rule: dict[str, Any]) -> None:
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["name"] == "cert-agent"
    assert rule["metadata"]["namespace"] == "cert-agent"
    assert rule["metadata"]["labels"]["app.kubernetes.io/name"] == "cert-agent"


def test_every_alert_tells_the_operator_what_to_do(rule: dict[str, Any]) -> None:
    rules = alert_rules(rule)
    assert {r["alert"] for r in rules} == ALERTS
    severities = {(r["alert"], r["labels"]["severity"]) for r in rules}
    assert ("CertAgentCertificateNotRenewed", "warning") in severities
    assert ("CertAgentCertificateNotRenewed", "critical") in severities
    assert ("CertAgentTmpfsAlmostFull", "warning") in severities
    assert ("CertAgentTmpfsAlmostFull", "critical") in severities
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"].strip(), r["alert"]
        anchor = f"docs/troubleshooting.md#{r['alert'].lower()}"
        assert anchor in r["annotations"]["description"], r["alert"]


def test_alerts_use_only_metrics_the_agent_exports(rule: dict[str, Any]) -> None:
    metrics = AgentMetrics()
    metrics.set_volume("vol-1", "ns", "pod-0", "local", 2.0, 1.0)  # per-volume series exist now
    exported = set()
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line and not line.startswith("#"):
            exported.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    used = {
        name for r in alert_rules(rule) for name in re.findall(r"\bcert_agent_[a-z_]+", r["expr"])
    }
    assert used, "the alerts should use the agent's metrics"
    assert used <= exported, used - exported


# --------------------------------------------------------------------------- promtool


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: apt-get install prometheus (see README, Development)")
    return path


@pytest.fixture
def rules_dir(rule: dict[str, Any], tmp_path: Path) -> Path:
    """rules.yaml (spec.groups) next to a copy of the unit tests that load it by that name."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(PROMTOOL_TESTS, tmp_path / "alerts_test.yaml")
    return tmp_path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.promtool
def test_promtool_check_rules(rule: dict[str, Any], rules_dir: Path) -> None:
    result = run(promtool(), "check", "rules", "rules.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules(rule))} rules found" in result.stdout


@pytest.mark.promtool
def test_promtool_unit_tests_cover_firing_and_quiet_cases(rules_dir: Path) -> None:
    result = run(promtool(), "test", "rules", "alerts_test.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout

    # Each alert is asserted both firing (exp_alerts) and quiet (no exp_alerts) somewhere.
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for alert in ALERTS:
        mine = [case for case in cases if case["alertname"] == alert]
        assert any(case.get("exp_alerts") for case in mine), f"{alert} never fires in a test"
        assert any(not case.get("exp_alerts") for case in mine), f"{alert} never stays quiet"


@pytest.mark.promtool
def test_promtool_unit_tests_fail_on_a_broken_rule(rule: dict[str, Any], rules_dir: Path) -> None:
    """The unit tests really test the rules: drop the 'no successes' clause and they fail."""
    groups = yaml.safe_load(yaml.safe_dump(rule["spec"]["groups"]))
    for r in groups[0]["rules"]:
        if r.get("alert") == "CertAgentRenewalsFailing":
            r["expr"] = r["expr"].split("unless")[0]
    (rules_dir / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    result = run(promtool(), "test", "rules", "alerts_test.yaml", cwd=rules_dir)
    assert result.returncode != 0
    assert "CertAgentRenewalsFailing" in result.stdout + result.stderr
