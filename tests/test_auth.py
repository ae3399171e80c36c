"""Bearer tokens: the token file, UNAUTHENTICATED on every RPC, tenants isolated by (owner, name)."""

from __future__ import annotations

import copy
import logging
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import lossd
from lossd.v1 import loss_service_pb2 as pb
from lossd.v1 import loss_service_pb2_grpc as pb_grpc
from lossd_server.auth import TokenFileError, anonymous, load_tokens, log_exposure, token_owner
from lossd_server.cli import main
from lossd_server.embedded import EmbeddedServer
from tests._security import ALICE, BOB, CAROL, settings, start_error, token_file

OLS = lossd.SessionSpec(kind="online_label_smoothing", n_classes=4, smoothing=0.1, alpha=0.5)
LOGITS = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
LABELS = torch.tensor([0, 1, 2])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(settings(token_file=token_file(tmp_path_factory.mktemp("auth")))) as running:
        yield running


def connect(server: EmbeddedServer, token: str) -> lossd.Client:
    # retry_deadline=0: a refused call must fail at once, not be retried.
    return lossd.Client(server.target, token=token, retry_deadline=0, timeout=10)


@pytest.fixture()
def alice(server: EmbeddedServer) -> Iterator[lossd.Client]:
    with connect(server, ALICE) as client:
        yield client


@pytest.fixture()
def bob(server: EmbeddedServer) -> Iterator[lossd.Client]:
    with connect(server, BOB) as client:
        yield client


# The token file ------------------------------------------------------------------


def test_token_file_names_tenants_and_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = token_file(tmp_path, f"# trainers\n\n  alice {ALICE}  \n\t{CAROL}\n# bob {BOB}\n")
    owners = [tenant.owner for tenant in load_tokens(path)]
    assert owners == ["alice", token_owner(CAROL)]
    assert token_owner(CAROL).startswith("token-") and CAROL not in token_owner(CAROL)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "has no tokens"),
        ("# only a comment\n\n", "has no tokens"),
        (f"alice {ALICE}\nbob {ALICE}\n", "line 2: duplicate token (first on line 1)"),
        (f"alice {ALICE}\n\nalice {BOB}\n", "line 3: duplicate tenant name 'alice' (first on line 1)"),
        (f"alice {ALICE} extra\n", "line 1: expected 'TOKEN' or 'NAME TOKEN', got 3 fields"),
        ("alice s3cr3t\n", "line 1: the token is shorter than 16 characters"),
        (f"alice {ALICE}é\n", "line 1: the token must be printable ASCII"),
        (f"-alice {ALICE}\n", "line 1: tenant name '-alice'"),
    ],
)
def test_a_bad_token_file_is_a_startup_error_naming_file_and_line(tmp_path: Path, text: str, expected: str) -> None:
    path = token_file(tmp_path, text)
    error = start_error(settings(token_file=path))
    assert isinstance(error, TokenFileError) and isinstance(error, ValueError)  # so `lossd serve` prints it
    assert str(path) in str(error) and expected in str(error)
    for token in (ALICE, BOB, "s3cr3t"):
        assert token not in str(error)


def test_an_unreadable_token_file_is_a_startup_error(tmp_path: Path) -> None:
    error = start_error(settings(token_file=tmp_path / "missing"))
    assert isinstance(error, TokenFileError)
    assert f"cannot read token file {tmp_path / 'missing'}" in str(error)


# Refused calls ---------------------------------------------------------------------


RPCS = [
    "CreateSession",
    "GetSession",
    "ListSessions",
    "ComputeLoss",
    "LossStream",
    "NextEpoch",
    "GetState",
    "LoadState",
    "DeleteSession",
]


def every_rpc(client: lossd.Client, session: str, state: lossd.SessionState) -> dict[str, Callable[[], Any]]:
    return {
        "CreateSession": lambda: client.create_session(session, OLS),
        "GetSession": lambda: client.get_session(session),
        "ListSessions": client.list_sessions,
        "ComputeLoss": lambda: client.compute_loss(session, LOGITS, LABELS, stream=False),
        "LossStream": lambda: client.compute_loss(session, LOGITS, LABELS, stream=True),
        "NextEpoch": lambda: client.next_epoch(session, 0),
        "GetState": lambda: client.get_state(session),
        "LoadState": lambda: client.load_state(session, state),
        "DeleteSession": lambda: client.delete_session(session),
    }


@pytest.mark.parametrize("token", ["", "not-a-known-token-0123456789"], ids=["missing", "wrong"])
@pytest.mark.parametrize("rpc", RPCS)
def test_a_call_without_a_known_token_is_unauthenticated(
    server: EmbeddedServer, alice: lossd.Client, token: str, rpc: str
) -> None:
    alice.create_session("guarded", OLS)
    state = alice.get_state("guarded")
    with connect(server, token) as intruder, pytest.raises(lossd.UnauthenticatedError) as caught:
        every_rpc(intruder, "guarded", state)[rpc]()
    assert "bearer token" in caught.value.message
    assert not token or token not in caught.value.message
    assert alice.get_session("guarded").samples_this_epoch == 0  # nothing was applied


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((), "requires a bearer token"),
        ((("authorization", f"Basic {ALICE}"),), "must use the Bearer scheme"),
        ((("authorization", "Bearer"),), "unknown bearer token"),
        ((("authorization", f"Bearer {ALICE}"), ("authorization", f"Bearer {ALICE}")), "more than one"),
    ],
)
def test_raw_grpc_calls_are_refused_on_unary_and_stream(
    server: EmbeddedServer, metadata: tuple[tuple[str, str], ...], expected: str
) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as unary:
            stub.ListSessions(pb.ListSessionsRequest(), metadata=metadata, timeout=10)
        with pytest.raises(grpc.RpcError) as stream:
            list(stub.LossStream(iter([pb.LossRequest(session="x")]), metadata=metadata, timeout=10))
        with pytest.raises(grpc.RpcError) as barrier:
            stub.NextEpoch(pb.NextEpochRequest(session="x"), metadata=metadata, timeout=10)
    for call in (unary.value, stream.value, barrier.value):
        assert call.code() == grpc.StatusCode.UNAUTHENTICATED, call
        assert expected in call.details()
        assert ALICE not in call.details()


def test_the_scheme_is_case_insensitive(server: EmbeddedServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]
        stub.ListSessions(pb.ListSessionsRequest(), metadata=(("authorization", f"bearer {ALICE}"),), timeout=10)


def test_health_and_reflection_need_no_token(server: EmbeddedServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        for service in ("", "lossd.v1.LossService"):
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        [reply] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert "lossd.v1.LossService" in [service.name for service in reply.list_services_response.service]


# Tenants -----------------------------------------------------------------------------


def test_another_tenants_session_is_not_found_by_every_rpc(alice: lossd.Client, bob: lossd.Client) -> None:
    alice.create_session("private-run", OLS)
    alice.compute_loss("private-run", LOGITS, LABELS)
    state = alice.get_state("private-run")
    calls = every_rpc(bob, "private-run", state)
    for rpc in ("GetSession", "ComputeLoss", "LossStream", "NextEpoch", "GetState", "LoadState", "DeleteSession"):
        with pytest.raises(lossd.NotFoundError):
            calls[rpc]()
    info = alice.get_session("private-run")  # untouched by every attempt
    assert (info.epoch, info.samples_this_epoch) == (0, 3)


def test_list_shows_only_ones_own_sessions(server: EmbeddedServer, alice: lossd.Client, bob: lossd.Client) -> None:
    alice.create_session("alice-only", OLS)
    bob.create_session("bob-only", OLS)
    with connect(server, CAROL) as carol:
        carol.create_session("carol-only", OLS)
        assert "carol-only" in [s.name for s in carol.list_sessions()]
        assert not {"alice-only", "bob-only"} & {s.name for s in carol.list_sessions()}
    assert "bob-only" not in {s.name for s in alice.list_sessions()}
    assert "alice-only" not in {s.name for s in bob.list_sessions()}


def test_the_same_name_in_two_tenants_is_two_independent_sessions(alice: lossd.Client, bob: lossd.Client) -> None:
    _, alice_created = alice.create_session("same-name", OLS)
    # Another spec under the same name would be ALREADY_EXISTS within one tenant.
    _, bob_created = bob.create_session("same-name", lossd.SessionSpec(kind="cross_entropy", n_classes=7))
    assert alice_created and bob_created
    alice.compute_loss("same-name", LOGITS, LABELS)
    assert alice.next_epoch("same-name", 0).epoch == 1
    info = bob.get_session("same-name")
    assert (info.spec.kind, info.spec.n_classes, info.epoch) == ("cross_entropy", 7, 0)
    bob.delete_session("same-name")
    assert alice.get_session("same-name").epoch == 1


# Client side ----------------------------------------------------------------------------


def test_the_token_is_sent_again_on_a_new_stream_after_a_restart(tmp_path: Path) -> None:
    config = settings(token_file=token_file(tmp_path))
    first = EmbeddedServer(config).start()
    port = int(first.target.rsplit(":", 1)[1])
    try:
        with lossd.Client(first.target, token=ALICE, retry_deadline=30) as client:
            client.create_session("stateless", lossd.SessionSpec(kind="cross_entropy", n_classes=4))
            client.compute_loss("stateless", LOGITS, LABELS)
            first.stop()
            with EmbeddedServer(config.model_copy(update={"port": port})):
                # The stream died with the old server: the retry opens a new one, which must carry the token.
                client.create_session("stateless", lossd.SessionSpec(kind="cross_entropy", n_classes=4))
                assert client.compute_loss("stateless", LOGITS, LABELS).n_used == 3
    finally:
        first.stop()


def test_the_token_comes_from_lossd_token_and_arguments_win(
    server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOSSD_TOKEN", f" {BOB}\n")  # as read from a file: surrounding whitespace is dropped
    with lossd.Client(server.target, retry_deadline=0) as client:
        client.create_session("from-env", OLS)
    with connect(server, BOB) as bob:
        assert "from-env" in {s.name for s in bob.list_sessions()}
    with lossd.Client(server.target, token=ALICE, retry_deadline=0) as client:
        assert "from-env" not in {s.name for s in client.list_sessions()}
    with lossd.Client(server.target, token="", retry_deadline=0) as client, pytest.raises(lossd.UnauthenticatedError):
        client.list_sessions()
    monkeypatch.setenv("LOSSD_TOKEN", "has a space")
    with pytest.raises(ValueError, match="LOSSD_TOKEN must be printable ASCII"):
        lossd.Client(server.target)


def test_the_token_stays_out_of_reprs(server: EmbeddedServer, alice: lossd.Client) -> None:
    assert ALICE not in repr(alice) and ALICE not in repr(alice.config)
    assert alice.config.token == ALICE


def test_modules_pass_the_token_and_never_pickle_it(server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOSSD_TOKEN", raising=False)
    with pytest.raises(lossd.UnauthenticatedError):
        lossd.CrossEntropyLoss(n_classes=4, target=server.target, retry_deadline=0)
    with lossd.OnlineLabelSmoothing(0.5, 4, target=server.target, token=ALICE, session="module-run") as criterion:
        criterion(LOGITS, LABELS)
        with copy.deepcopy(criterion) as twin:  # in-process copies keep the token
            twin(LOGITS, LABELS)
        data = pickle.dumps(criterion)
        assert ALICE.encode() not in data
        with pytest.raises(lossd.UnauthenticatedError):
            pickle.loads(data)(LOGITS, LABELS)
        monkeypatch.setenv("LOSSD_TOKEN", ALICE)  # an unpickled module takes its token from the environment
        with pickle.loads(data) as restored:
            restored(LOGITS, LABELS)
    with connect(server, ALICE) as alice:
        assert alice.get_session("module-run").samples_this_epoch == 9
        alice.delete_session("module-run")


# Start-up messages --------------------------------------------------------------------------


def test_startup_logs_say_who_can_reach_the_server(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO, logger="lossd_server")
    log_exposure(settings(host=None), anonymous)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "loopback only (127.0.0.1)" in caplog.text and "--token-file" in caplog.text
    caplog.clear()
    log_exposure(settings(host="0.0.0.0"), anonymous)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "without --token-file" in caplog.text
    caplog.clear()
    log_exposure(settings(host="127.0.0.1"), anonymous)
    assert not caplog.records


def test_sessions_name_their_owner_and_lossd_sessions_shows_only_the_callers(
    server: EmbeddedServer, alice: lossd.Client, bob: lossd.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    alice.create_session("owned-by-alice", lossd.SessionSpec(kind="cross_entropy", n_classes=3))
    bob.create_session("owned-by-bob", lossd.SessionSpec(kind="cross_entropy", n_classes=3))
    assert alice.get_session("owned-by-alice").owner == "alice"
    assert [info.owner for info in bob.list_sessions()] == ["bob"] * len(bob.list_sessions())
    assert main(["sessions", "--target", server.target, "--token", ALICE]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert ["owned-by-alice", "alice"] in [[row[0], row[6]] for row in rows]
    assert all(row[6] == "alice" for row in rows)
    assert main(["sessions", "--target", server.target, "--token", "not-a-valid-token-at-all"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lossd sessions: ") and err.count("\n") == 1
