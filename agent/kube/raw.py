"""A JSON request through the agent's client, without the generated model classes.

The generated methods coerce a body into their model (pydantic), which drops or rewrites what
the model does not know (a field of a newer API version, bytes fields); the signer and the
trust bundle publisher send and read objects as plain JSON instead. Auth, TLS, the rate limit
and the error type (``ApiException``) are those of every other call.
"""

from __future__ import annotations

import json
from typing import Any, cast

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

Obj = dict[str, Any]


def request_json(
    api: k8s.ApiClient,
    method: str,
    path: str,
    body: Obj | None = None,
    *,
    timeout: float | tuple[float, float] | None = None,
) -> Obj:
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    serialized = api.param_serialize(
        method=method,
        resource_path=path,
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    response = api.call_api(*serialized, _request_timeout=timeout)
    data = response.read()  # type: ignore[no-untyped-call]
    if not 200 <= response.status <= 299:
        raise ApiException.from_response(http_resp=response, body=None, data=None)
    return cast(Obj, json.loads(data))
