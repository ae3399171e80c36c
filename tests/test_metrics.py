"""Prometheus metrics: exact request counts by RPC and status, training samples, store gauges, the HTTP endpoint."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import lossd
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server import __version__
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer
from lossd_server.metrics import RPCS, SampleRate
from tests.conftest import ComputeGate

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
CE = lossd.SessionSpec(kind="cross_entropy", n_classes=4)
OLS = lossd.SessionSpec(kind="online_label_smoothing", n_classes=10, alpha=0.5, smoothing=0.1)


def _settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = dict(
        host="127.0.0.1", port=0, device="cpu", metrics_port=0, store="memory", workers=2, grace_seconds=1
    )
    return Settings(**(base | overrides))


@pytest.fixture()
def metered() -> Iterator[EmbeddedServer]:
    """A server of its own per test, so every count starts at zero."""
    with EmbeddedServer(_settings()) as server:
        yield server


def scrape(server: EmbeddedServer) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests(samples: Samples, rpc: str, code: str) -> float:
    return value(samples, "lossd_requests_total", rpc=rpc, code=code)


def streams_ended(samples: Samples, code: str) -> float:
    return value(samples, "lossd_streams_total", rpc="LossStream", code=code)


def wait_for(server: EmbeddedServer, check: Callable[[Samples], bool], timeout: float = 5.0) -> Samples:
    """Scrape until ``check(samples)`` holds: the server counts a stream's end, or an aborted call,
    after the client has its answer."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def batch(n: int, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return torch.randn(n, classes, generator=generator), torch.randint(0, classes, (n,), generator=generator)


def test_unary_calls_are_counted_by_rpc_and_the_code_the_client_saw(metered: EmbeddedServer) -> None:
    with lossd.Client(metered.target) as client:
        client.create_session("ce", CE)
        for _ in range(3):
            client.compute_loss("ce", *batch(8), stream=False)
        with pytest.raises(lossd.NotFoundError):
            client.get_session("missing")
        logits, _ = batch(8)
        with pytest.raises(lossd.InvalidArgumentError):
            client.compute_loss("ce", logits, torch.full((8,), 7), stream=False)  # label 7 of 4 classes
    # abort() sends the status before the interceptor's count runs: wait for the last refusal to be counted.
    samples = wait_for(metered, lambda s: requests(s, "ComputeLoss", "INVALID_ARGUMENT") == 1)
    assert requests(samples, "CreateSession", "OK") == 1
    assert requests(samples, "ComputeLoss", "OK") == 3
    assert requests(samples, "ComputeLoss", "INVALID_ARGUMENT") == 1
    assert requests(samples, "GetSession", "NOT_FOUND") == 1
    assert requests(samples, "GetSession", "OK") == 0
    # Every RPC is exported from the start, at 0, so rate() has a first point.
    assert {dict(labels)["rpc"] for name, labels in samples if name == "lossd_requests_total"} == set(RPCS)
    assert value(samples, "lossd_request_duration_seconds_count", rpc="ComputeLoss") == 4
    assert value(samples, "lossd_request_duration_seconds_sum", rpc="ComputeLoss") > 0
    assert value(samples, "lossd_request_duration_seconds_count", rpc="GetSession") == 1


def test_local_steps_are_counted_with_their_status(metered: EmbeddedServer) -> None:
    with lossd.Client(metered.target, transport="local") as client:
        client.create_session("ce-local", CE)
        for _ in range(3):
            client.compute_loss("ce-local", *batch(8))
        with pytest.raises(lossd.NotFoundError):
            client.compute_loss("nope", *batch(8))
        samples = scrape(metered)
    assert requests(samples, "LocalStep", "OK") == 3
    assert requests(samples, "LocalStep", "NOT_FOUND") == 1
    assert value(samples, "lossd_request_duration_seconds_count", rpc="LocalStep") == 4
    assert requests(samples, "LossStream", "OK") == 0


def test_each_stream_request_is_counted_with_its_in_band_status(metered: EmbeddedServer) -> None:
    with lossd.Client(metered.target, transport="grpc") as client:
        client.create_session("ce", CE)
        for _ in range(4):
            client.compute_loss("ce", *batch(8))
        with pytest.raises(lossd.InvalidArgumentError):
            client.compute_loss("ce", batch(8)[0], torch.full((8,), 7))
        with pytest.raises(lossd.NotFoundError):
            client.compute_loss("nope", *batch(8))
        client.compute_loss("ce", *batch(8))  # the stream survives its rejected requests
        samples = scrape(metered)
        assert requests(samples, "LossStream", "OK") == 5
        assert requests(samples, "LossStream", "INVALID_ARGUMENT") == 1
        assert requests(samples, "LossStream", "NOT_FOUND") == 1
        assert value(samples, "lossd_request_duration_seconds_count", rpc="LossStream") == 7
        assert value(samples, "lossd_streams_open", rpc="LossStream") == 1
        assert requests(samples, "ComputeLoss", "OK") == 0
    samples = wait_for(metered, lambda s: value(s, "lossd_streams_open", rpc="LossStream") == 0)
    assert value(samples, "lossd_streams_open", rpc="LossStream") == 0
    ended = {dict(labels)["code"]: v for (name, labels), v in samples.items() if name == "lossd_streams_total"}
    assert sum(ended.values()) == 1, ended  # the one stream, whatever status closing it gave
    assert requests(samples, "LossStream", "OK") == 5


def test_training_samples_count_applied_training_rows_only(metered: EmbeddedServer) -> None:
    with lossd.Client(metered.target) as client:
        client.create_session("ols", OLS)
        client.create_session("ce", CE)
        client.compute_loss("ols", *batch(8, 10))
        client.compute_loss("ce", *batch(5), stream=False)
        logits, labels = batch(6)
        labels[:2] = -100  # ignore_index rows are not applied
        client.compute_loss("ce", logits, labels)
        client.compute_loss("ols", *batch(7, 10), training=False)  # eval never counts
        client.compute_loss("ce", *batch(9), training=False, stream=False)
        # A resend under the same id is answered from the replay log, not applied again.
        logits, labels = batch(3)
        client.compute_loss("ce", logits, labels, request_id="step-1", stream=False)
        client.compute_loss("ce", logits, labels, request_id="step-1", stream=False)
        with pytest.raises(lossd.InvalidArgumentError):
            client.compute_loss("ce", logits, torch.full((3,), 9))  # refused: nothing applied
        assert client.get_session("ols").samples_this_epoch == 8
    samples = scrape(metered)
    assert value(samples, "lossd_training_samples_total") == 8 + 5 + 4 + 3
    assert value(samples, "lossd_training_samples_per_second") > 0


def test_store_gauges_follow_the_sessions(metered: EmbeddedServer) -> None:
    with lossd.Client(metered.target) as client:
        assert value(scrape(metered), "lossd_sessions") == 0
        ols, _ = client.create_session("ols", OLS)
        ce, _ = client.create_session("ce", CE)
        samples = scrape(metered)
        assert value(samples, "lossd_sessions") == 2
        assert ols.state_bytes == 12 * 10 * 10 + 8 * 10
        assert value(samples, "lossd_matrix_bytes") == ols.state_bytes + ce.state_bytes
        assert ("lossd_snapshot_age_seconds", frozenset()) in samples
        assert value(samples, "lossd_snapshot_age_seconds") == 0.0  # a memory store saves nothing
        client.delete_session("ols")
        samples = scrape(metered)
    assert value(samples, "lossd_sessions") == 1
    assert value(samples, "lossd_matrix_bytes") == 0
    assert value(samples, "lossd_build_info", version=__version__, torch=torch.__version__, device="cpu") == 1


def test_next_epoch_time_is_kept_apart_from_request_latency(metered: EmbeddedServer) -> None:
    with lossd.Client(metered.target) as client:
        client.create_session("ols", OLS)
        client.compute_loss("ols", *batch(8, 10))
        client.next_epoch("ols", 0)
    samples = scrape(metered)
    assert requests(samples, "NextEpoch", "OK") == 1
    assert value(samples, "lossd_next_epoch_duration_seconds_count") == 1
    assert ("lossd_request_duration_seconds_count", frozenset({("rpc", "NextEpoch")})) not in samples


def test_a_refused_token_is_counted_as_unauthenticated(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice 0123456789abcdef0123\n")
    with EmbeddedServer(_settings(token_file=tokens)) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetSession(pb.GetSessionRequest(name="x"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", "Bearer 0123456789abcdef0123"),)
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetSession(pb.GetSessionRequest(name="x"), timeout=5, metadata=metadata)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        # abort() sends the status before the interceptor's count runs: wait for the refusal to be counted.
        samples = wait_for(server, lambda s: requests(s, "GetSession", "NOT_FOUND") == 1)
        assert requests(samples, "GetSession", "UNAUTHENTICATED") == 1
        assert requests(samples, "GetSession", "NOT_FOUND") == 1

        # A stream whose credentials are refused ends before any request is counted.
        request = pb.LossRequest(session="x", training=True)
        with pytest.raises(grpc.RpcError) as stream_refused:
            list(stub.LossStream(iter([request]), timeout=5))
        assert stream_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        samples = wait_for(server, lambda s: streams_ended(s, "UNAUTHENTICATED") == 1)
    assert streams_ended(samples, "UNAUTHENTICATED") == 1
    assert sum(requests(samples, "LossStream", code) for code in ("OK", "UNAUTHENTICATED", "NOT_FOUND")) == 0


def test_a_call_cut_off_by_its_deadline_counts_as_deadline_exceeded(
    metered: EmbeddedServer, compute_gate: ComputeGate
) -> None:
    with lossd.Client(metered.target, timeout=0.5) as client:
        client.create_session("ce", CE)
        with pytest.raises(lossd.DeadlineExceededError):
            client.compute_loss("ce", *batch(8), stream=False)  # held in compute past its deadline
        assert compute_gate.entered.acquire(timeout=5)  # the handler ran: gRPC did not refuse it up front
        time.sleep(0.3)  # past the server's deadline too, which starts a little after the client's
        compute_gate.release.set()
        samples = wait_for(metered, lambda s: requests(s, "ComputeLoss", "DEADLINE_EXCEEDED") == 1)
    computed = {
        dict(labels)["code"]: v
        for (name, labels), v in samples.items()
        if name == "lossd_requests_total" and ("rpc", "ComputeLoss") in labels
    }
    assert computed == {"OK": 0, "DEADLINE_EXCEEDED": 1}


def test_health_checks_are_not_counted(metered: EmbeddedServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(metered.target) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    samples = scrape(metered)
    assert sum(v for (name, _), v in samples.items() if name == "lossd_requests_total") == 0


def test_servers_in_one_process_keep_separate_figures() -> None:
    with EmbeddedServer(_settings()) as first, EmbeddedServer(_settings()) as second:
        assert first.metrics_port != second.metrics_port
        with lossd.Client(first.target) as client:
            client.create_session("ce", CE)
        assert requests(scrape(first), "CreateSession", "OK") == 1
        assert requests(scrape(second), "CreateSession", "OK") == 0


def test_the_metrics_endpoint_stops_with_the_server() -> None:
    server = EmbeddedServer(_settings()).start()
    try:
        port = server.metrics_port
        assert port
        assert "lossd_sessions" in {name for name, _ in scrape(server)}
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_are_off_unless_a_port_is_set() -> None:
    with EmbeddedServer(_settings(metrics_port=None)) as server:
        assert server.metrics_port is None


def test_sample_rate_counts_the_recent_window_only() -> None:
    now = [1000.0]
    rate = SampleRate(window=10, clock=lambda: now[0])
    now[0] = 1020.0
    rate.add(50)
    now[0] = 1025.5
    rate.add(50)
    assert rate.per_second() == pytest.approx(10.0)  # 100 samples in the last 10 s
    now[0] = 1033.0  # the first batch is now older than the window
    assert rate.per_second() == pytest.approx(5.0)
    now[0] = 1100.0
    assert rate.per_second() == 0.0
    young = SampleRate(window=60, clock=lambda: now[0])
    now[0] += 4.0
    young.add(40)
    assert young.per_second() == pytest.approx(10.0)  # up for 4 s: divided by 4, not by the window
