"""What the Globus Compute action provider would submit for a ``fabric flow`` definition,
submitted through the offline Globus Compute (the real Executor and endpoint daemon): the
resolved body's endpoint id, function id, JSON kwargs and user endpoint config, with no token.

The action provider serialises the JSON ``kwargs`` itself with a strategy its documentation does
not name; both candidates are sent: ``JSONData`` (what the fabric's own client sends) is
served, and the SDK's default ``ComputeSerializer`` (pickled ``DillDataBase64``) is refused by
the endpoint before anything is unpickled: no site accepts pickled data.
"""

from __future__ import annotations

import pytest

from fabric import flows
from fabric.sites import load_site
from fabric.wire import gcwire
from tests.plugins.globus_offline import OfflineGlobus
from tests.plugins.site import TINY_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.globus]


def submit_like_the_action_provider(globus: OfflineGlobus, body: dict, serializer: object
                                    ) -> object:
    from globus_compute_sdk import Executor

    (task,) = body["tasks"]
    executor = Executor(endpoint_id=body["endpoint_id"], client=globus.client(),
                        user_endpoint_config=body["user_endpoint_config"],
                        serializer=serializer)
    try:
        future = executor.submit_to_registered_function(task["function_id"],
                                                        args=task.get("args", ()),
                                                        kwargs=task["kwargs"])
        return gcwire.unwrap(future.result(timeout=180))
    finally:
        executor.shutdown(wait=False)


def _request_body(globus: OfflineGlobus) -> dict:
    site = load_site(globus.site_dir)
    definition, _ = flows.request_flow(site, TINY_MODEL)
    body = flows.action_body(definition, {"prompt": "The mitochondria is",
                                          "sampling": {"max_tokens": 4, "temperature": 0.0},
                                          "user_endpoint_config": {"request_workers": 2}})
    assert body["endpoint_id"] == globus.endpoint_id
    assert body["tasks"][0]["function_id"] == globus.function_ids["run_request"]
    return body


def test_request_flow_through_offline_compute(globus_asserted: OfflineGlobus) -> None:
    body = _request_body(globus_asserted)
    since = len(globus_asserted.service.submissions)
    result = submit_like_the_action_provider(globus_asserted, body, gcwire.data_serializer())
    assert isinstance(result, dict) and len(result["token_ids"]) == 4
    sent = globus_asserted.service.submissions[since:]
    assert [s.get("user_endpoint_config") for s in sent] == [{"request_workers": 2}]
    # No bearer (the fake's all start "fake-") in what the cloud stored.
    assert all("fake-" not in p and "access_token" not in p
               for s in sent for ps in s["tasks"].values() for p in ps)


def test_a_pickled_flow_body_is_refused_before_unpickling(globus_asserted: OfflineGlobus
                                                         ) -> None:
    """Were the action provider to pickle the kwargs (the SDK's default serializer), the
    endpoint refuses the task by its serializer before deserialising anything."""
    from globus_compute_sdk.errors import TaskExecutionFailed

    body = _request_body(globus_asserted)
    with pytest.raises(TaskExecutionFailed, match="Deserialization failed"):
        submit_like_the_action_provider(globus_asserted, body, gcwire.default_serializer())


def test_shard_flow_through_offline_compute(globus_asserted: OfflineGlobus) -> None:
    site = load_site(globus_asserted.site_dir)
    definition, _ = flows.shard_flow(site, TINY_MODEL)
    items = [{"custom_id": f"c{i}", "request": {"prompt": f"Sample {i}: the enzyme",
                                                 "sampling": {"max_tokens": 3}}}
             for i in range(3)]
    body = flows.action_body(definition, {"shard_id": "flow-1", "campaign": "nightly",
                                          "items": items, "user_endpoint_config": {}})
    result = submit_like_the_action_provider(globus_asserted, body, gcwire.data_serializer())
    assert isinstance(result, dict) and result["shard_id"] == "flow-1"
    assert [r["custom_id"] for r in result["results"]] == ["c0", "c1", "c2"]
    assert all(r["ok"] for r in result["results"]), result["results"]
