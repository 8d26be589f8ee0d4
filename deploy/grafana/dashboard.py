"""Generates deploy/grafana/cert-agent.json with the Grafana Foundation SDK (a dev dependency).

    .venv/bin/python deploy/grafana/dashboard.py > deploy/grafana/cert-agent.json   (make dashboard)

tests/test_grafana.py fails when the committed JSON differs from what this prints, runs every
panel's PromQL against a real Prometheus scraping a real agent, and round-trips the JSON through
the SDK's dashboard model. Queries use only `cert_agent_*` metrics (README, Metrics) and the
`node` label the PodMonitor adds.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import (
    bargauge,
    histogram,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.builders.common import TableSortByFieldState
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    Dashboard as DashboardModel,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DataTransformerConfig,
    Threshold,
    ThresholdsMode,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

UID = "cert-agent"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
DAY = 86400


def query(expr: str, legend: str = "", ref: str = "A") -> Dataquery:
    q = Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    return q.legend_format(legend) if legend else q


def instant_table(expr: str, ref: str = "A") -> Dataquery:
    return query(expr, ref=ref).instant().format(PromQueryFormat.TABLE)


def days_thresholds() -> ThresholdsConfig:
    """Red under 7 days left, orange under 30."""
    return (
        ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps(
            [
                Threshold(color="red", value=None),
                Threshold(color="orange", value=7 * DAY),
                Threshold(color="green", value=30 * DAY),
            ]
        )
    )


def build() -> Dashboard:
    return (
        Dashboard("cert-agent")
        .uid(UID)
        .description("Per-pod certificates issued by csi-cert-agent: expiry, renewals, latency.")
        .tags(["cert-agent", "certificates", "csi"])
        .refresh("1m")
        .time("now-6h", "now")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_row(Row("Certificates"))
        .with_panel(
            table.Panel()
            .title("Certificates closest to expiry")
            .description(
                "The 25 certificates with the least time left, with the time their renewal was "
                "due. A due time in the past means renewals are failing: see `cert-agent "
                "status` on that node and the pod's events."
            )
            .datasource(DATASOURCE)
            .with_target(
                instant_table(
                    "bottomk(25, cert_agent_certificate_expiry_timestamp_seconds - time())"
                )
            )
            .with_target(
                instant_table(
                    "(cert_agent_certificate_renewal_timestamp_seconds - time()) and on (volume_id)"
                    " bottomk(25, cert_agent_certificate_expiry_timestamp_seconds - time())",
                    ref="B",
                )
            )
            # One row per volume: join the two queries, drop scrape labels, name the columns.
            .with_transformation(DataTransformerConfig(id_val="merge", options={}))
            .with_transformation(
                DataTransformerConfig(
                    id_val="organize",
                    options={
                        "excludeByName": {
                            "Time": True,
                            "job": True,
                            "instance": True,
                            "endpoint": True,
                            "container": True,
                        },
                        "renameByName": {
                            "Value #A": "time left",
                            "Value #B": "renewal due in",
                            "volume_id": "volume",
                        },
                    },
                )
            )
            .sort_by([TableSortByFieldState().display_name("time left")])
            .unit("s")
            .thresholds(days_thresholds())
            .height(10)
            .span(16)
        )
        .with_panel(
            stat.Panel()
            .title("Past their renewal time")
            .description("Certificates whose renewal is overdue (renewals failing).")
            .datasource(DATASOURCE)
            .with_target(
                query(
                    "count(cert_agent_certificate_renewal_timestamp_seconds < time()) or vector(0)"
                )
            )
            .thresholds(
                ThresholdsConfig()
                .mode(ThresholdsMode.ABSOLUTE)
                .steps([Threshold(color="green", value=None), Threshold(color="red", value=1)])
            )
            .height(5)
            .span(8)
        )
        .with_panel(
            stat.Panel()
            .title("Local CA expires in")
            .description("Time left on each agent's local CA (cert_agent_ca_expiry).")
            .datasource(DATASOURCE)
            .with_target(query("min(cert_agent_ca_expiry_timestamp_seconds) - time()"))
            .unit("s")
            .thresholds(days_thresholds())
            .height(5)
            .span(8)
        )
        .with_panel(
            histogram.Panel()
            .title("Time left, distribution (days)")
            .description("How many certificates have how many days left.")
            .datasource(DATASOURCE)
            .with_target(
                query(
                    "(cert_agent_certificate_expiry_timestamp_seconds - time()) / 86400",
                    legend="{{namespace}}/{{pod}}",
                ).instant()
            )
            .unit("d")
            .height(8)
            .span(12)
        )
        .with_panel(
            bargauge.Panel()
            .title("Managed volumes per node")
            .datasource(DATASOURCE)
            .with_target(query("sum by (node) (cert_agent_managed_volumes)", "{{node}}"))
            .height(8)
            .span(12)
        )
        .with_panel(
            bargauge.Panel()
            .title("Node CA expires in, per node")
            .description(
                "Node CA mode only: time left on each node's intermediate CA (empty otherwise). "
                "It renews ahead; a value that keeps falling means its renewals fail."
            )
            .datasource(DATASOURCE)
            .with_target(
                query(
                    "min by (node) (cert_agent_node_ca_expiry_timestamp_seconds > 0) - time()",
                    "{{node}}",
                )
            )
            .unit("s")
            .thresholds(days_thresholds())
            .height(8)
            .span(12)
        )
        .with_panel(
            timeseries.Panel()
            .title("Node CA requests by outcome")
            .description("Node CA mode only: node CA requests, issued or the failure reason.")
            .datasource(DATASOURCE)
            .with_target(
                query(
                    "sum by (outcome) (increase(cert_agent_node_ca_requests_total"
                    "[$__rate_interval]))",
                    "{{outcome}}",
                )
            )
            .height(8)
            .span(12)
        )
        .with_row(Row("Issuance"))
        .with_panel(
            timeseries.Panel()
            .title("Issues and renewals, and failures by reason")
            .description("Attempts per operation, and failed attempts by issuer and reason.")
            .datasource(DATASOURCE)
            .with_target(
                query(
                    "sum by (operation) (increase(cert_agent_issue_attempts_total"
                    "[$__rate_interval]))",
                    "{{operation}} attempts",
                )
            )
            .with_target(
                query(
                    "sum by (issuer, operation, reason) (increase("
                    "cert_agent_issue_failures_total[$__rate_interval]))",
                    "{{operation}} failed: {{reason}} ({{issuer}})",
                    ref="B",
                )
            )
            .height(8)
            .span(12)
        )
        .with_panel(
            timeseries.Panel()
            .title("Issue latency by issuer (p50, p90, p99)")
            .datasource(DATASOURCE)
            .with_target(latency("cert_agent_issue_duration_seconds", "issuer", 0.5, "A"))
            .with_target(latency("cert_agent_issue_duration_seconds", "issuer", 0.9, "B"))
            .with_target(latency("cert_agent_issue_duration_seconds", "issuer", 0.99, "C"))
            .unit("s")
            .height(8)
            .span(12)
        )
        .with_panel(
            timeseries.Panel()
            .title("Events on pods by result")
            .description(
                "Kubernetes Events the agents wrote on pods, and those a rate limit deferred "
                "(counted in the Event's series), a full queue dropped, or the API refused."
            )
            .datasource(DATASOURCE)
            .with_target(
                query(
                    "sum by (result) (increase(cert_agent_events_total[$__rate_interval]))",
                    "{{result}}",
                )
            )
            .height(8)
            .span(24)
        )
        .with_row(Row("Pod certificates (PodCertificateRequest signer)"))
        .with_panel(
            timeseries.Panel()
            .title("Pod certificate requests by signer and outcome")
            .description(
                "PCR signer mode only: requests answered, issued or denied/failed with the "
                "condition reason (empty otherwise)."
            )
            .datasource(DATASOURCE)
            .with_target(
                query(
                    "sum by (signer, outcome, reason) (increase("
                    "cert_agent_pcr_requests_total[$__rate_interval]))",
                    "{{signer}} {{outcome}} {{reason}}",
                )
            )
            .height(8)
            .span(12)
        )
        .with_panel(
            timeseries.Panel()
            .title("Pod certificate signing latency by signer (p50, p99)")
            .description("PCR signer mode only: from the request in the watch to its status.")
            .datasource(DATASOURCE)
            .with_target(latency("cert_agent_pcr_sign_latency_seconds", "signer", 0.5, "A"))
            .with_target(latency("cert_agent_pcr_sign_latency_seconds", "signer", 0.99, "B"))
            .unit("s")
            .height(8)
            .span(12)
        )
        .with_row(Row("CSI gRPC"))
        .with_panel(
            timeseries.Panel()
            .title("gRPC latency by method (p50, p99)")
            .datasource(DATASOURCE)
            .with_target(latency("cert_agent_grpc_request_duration_seconds", "method", 0.5, "A"))
            .with_target(latency("cert_agent_grpc_request_duration_seconds", "method", 0.99, "B"))
            .unit("s")
            .height(8)
            .span(12)
        )
        .with_panel(
            timeseries.Panel()
            .title("gRPC errors by method and code")
            .description("Failed CSI calls; kubelet shows the same codes in FailedMount events.")
            .datasource(DATASOURCE)
            .with_target(
                query(
                    'sum by (method, code) (rate(cert_agent_grpc_requests_total{code!="OK"}'
                    "[$__rate_interval]))",
                    "{{method}} {{code}}",
                )
            )
            .unit("reqps")
            .height(8)
            .span(12)
        )
    )


def latency(metric: str, by: str, quantile: float, ref: str) -> Dataquery:
    return query(
        f"histogram_quantile({quantile}, sum by (le, {by}) "
        f"(rate({metric}_bucket[$__rate_interval])))",
        f"p{round(quantile * 100)} {{{{{by}}}}}",
        ref=ref,
    )


def model() -> DashboardModel:
    """The dashboard, with panel ids numbered in order (Grafana needs them unique)."""
    dashboard = build().build()
    for number, panel in enumerate(dashboard.panels or [], start=1):
        panel.id_val = number
    return dashboard


def render() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(model()) + "\n"


if __name__ == "__main__":
    print(render(), end="")
