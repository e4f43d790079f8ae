"""raylm's spans through the real OTLP/HTTP exporter into a real receiver (tests/otlp.py): off costs nothing,
spans arrive connected within and across processes, a bad traceparent starts a new trace, a down collector
never holds a request."""

import threading
import time

import pytest
from helpers import free_port
from otlp import OTLPReceiver, tree

from raylm.serve import tracing
from raylm.serve.tracing import (
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_ID,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    Tracing,
    epoch_ns,
    now_ns,
    valid_traceparent,
)

GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
MS = 1_000_000


@pytest.fixture(scope="module")
def receiver():
    with OTLPReceiver() as receiver:
        yield receiver


@pytest.fixture
def ingress(receiver):
    on = Tracing(receiver.endpoint, "raylm-ingress", {"deployment.environment.name": "test"})
    yield on
    on.shutdown()


def _batch_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("OtelBatch")}


def test_off_answers_nothing_and_builds_nothing():
    before = _batch_threads()
    for off in (Tracing(None, "x"), Tracing("", "x")):
        span = off.start("request", GOOD, kind="server", attributes={GEN_AI_REQUEST_MODEL: "m"}, start_ns=now_ns())
        off.end(span, attributes={GEN_AI_USAGE_OUTPUT_TOKENS: 1}, error="no")
        off.flush()
        off.shutdown()
        assert (off.enabled, span, off.record("prefill", span, 1, 2), off.traceparent(span),
                off.trace_id(span)) == (False, None, None, None, "")
    assert _batch_threads() == before


def test_a_server_span_and_its_live_and_recorded_children_arrive_connected(receiver, ingress):
    submitted = time.perf_counter()
    root = ingress.start("POST /v1/chat/completions", kind="server", attributes={GEN_AI_REQUEST_MODEL: "tiny"})
    route = ingress.start("route", root, attributes={"raylm.replica": "r1"})
    time.sleep(0.005)
    ingress.end(route)
    # Measured after the fact, as the replica knows prefill (submit → first token) only once the token came.
    at = epoch_ns(submitted)
    ingress.record("prefill", root, at, at + 5 * MS, {GEN_AI_USAGE_INPUT_TOKENS: 12})
    ingress.end(root, attributes={GEN_AI_USAGE_OUTPUT_TOKENS: 7, GEN_AI_RESPONSE_ID: "chatcmpl-1"})
    trace_id = ingress.trace_id(root)

    # No flush: the schedule delay alone sends them.
    receiver.wait_for(lambda spans: sum(s.trace_id == trace_id for s in spans) == 3, timeout_s=5)
    prefill, server, child = receiver.trace(trace_id)  # by start: prefill began at submit, before the server span
    print(tree([server, prefill, child]))
    assert [s.name for s in (server, prefill, child)] == ["POST /v1/chat/completions", "prefill", "route"]
    assert (server.kind, server.parent_span_id, server.service_name) == ("server", "", "raylm-ingress")
    assert child.parent_span_id == prefill.parent_span_id == server.span_id
    assert server.attributes == {GEN_AI_REQUEST_MODEL: "tiny", GEN_AI_USAGE_OUTPUT_TOKENS: 7,
                                 GEN_AI_RESPONSE_ID: "chatcmpl-1"}
    assert child.attributes == {"raylm.replica": "r1"} and child.duration_ms >= 5
    assert prefill.attributes == {GEN_AI_USAGE_INPUT_TOKENS: 12} and prefill.end_ns - prefill.start_ns == 5 * MS
    assert 0 <= server.start_ns - prefill.start_ns < 50 * MS  # the perf_counter reading landed at its epoch time


def test_a_traceparent_from_another_process_continues_the_trace(receiver, ingress):
    replica = Tracing(receiver.endpoint, "raylm-replica")
    client_span = "b7ad6b7169203331"
    server = ingress.start("request", f"00-0af7651916cd43dd8448eb211c80319c-{client_span}-01", kind="server")
    header = ingress.traceparent(server)  # what the ingress answers, and sends on to the replica
    replica.end(replica.start("generate", header, kind="server"))
    ingress.end(server)
    replica.flush()
    ingress.flush()
    replica.shutdown()

    request, generate = receiver.trace("0af7651916cd43dd8448eb211c80319c")
    assert header == f"00-0af7651916cd43dd8448eb211c80319c-{request.span_id}-01"
    assert (request.name, request.parent_span_id, request.service_name) == ("request", client_span, "raylm-ingress")
    assert (generate.name, generate.parent_span_id, generate.service_name) == ("generate", request.span_id,
                                                                               "raylm-replica")


@pytest.mark.parametrize("header", [
    "garbage", "", GOOD.upper(), GOOD[:-1], GOOD + "-00", " " + GOOD,
    "01" + GOOD[2:], "ff" + GOOD[2:],  # only version 00 is read
    "00-" + "0" * 32 + GOOD[35:], GOOD[:36] + "0" * 16 + "-01",  # all-zero ids are invalid
])
def test_a_malformed_traceparent_starts_a_new_trace(receiver, ingress, header):
    span = ingress.start("request", header, kind="server")
    ingress.end(span)
    ingress.flush()
    [request] = receiver.trace(ingress.trace_id(span))
    assert valid_traceparent(header) is None
    assert request.parent_span_id == "" and request.trace_id not in header


def test_a_well_formed_traceparent_is_valid_as_written():
    assert valid_traceparent(GOOD) == GOOD
    assert valid_traceparent(GOOD[:-2] + "00") == GOOD[:-2] + "00"


def test_a_caller_that_did_not_sample_gets_no_spans_and_its_flag_back(receiver, ingress):
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4736"
    span = ingress.start("request", f"00-{trace_id}-00f067aa0ba902b7-00", kind="server")
    ingress.end(span)
    ingress.flush()
    assert ingress.trace_id(span) == trace_id and ingress.traceparent(span).endswith("-00")
    assert receiver.trace(trace_id) == []


def test_an_error_ends_its_span_with_error_status(receiver, ingress):
    span = ingress.start("generate")
    ingress.end(span, error="EngineDeadError: the engine stopped")
    ingress.flush()
    [generate] = receiver.trace(ingress.trace_id(span))
    assert (generate.status, generate.status_message) == ("error", "EngineDeadError: the engine stopped")


def test_tree_draws_a_trace_with_start_offsets_and_durations(receiver, ingress):
    t = now_ns()
    request = ingress.record("request", None, t, t + 100 * MS)
    admission = ingress.record("admission", request, t + 10 * MS, t + 30 * MS)
    ingress.record("adapter load", admission, t + 12 * MS, t + 20 * MS)
    ingress.record("decode", request, t + 40 * MS, t + 90 * MS)
    failed = ingress.start("retry", request, start_ns=t + 95 * MS)
    ingress.end(failed, t + 96 * MS, error="replica died")
    ingress.flush()

    drawn = tree(receiver.trace(ingress.trace_id(request)))
    print(drawn)
    assert drawn.splitlines() == [
        "request [raylm-ingress]  +0.0 ms  100.0 ms",
        "  admission [raylm-ingress]  +10.0 ms  20.0 ms",
        "    adapter load [raylm-ingress]  +12.0 ms  8.0 ms",
        "  decode [raylm-ingress]  +40.0 ms  50.0 ms",
        "  retry [raylm-ingress]  +95.0 ms  1.0 ms  ERROR replica died",
    ]


def test_a_down_collector_never_holds_a_request():
    down = Tracing(f"http://127.0.0.1:{free_port()}", "raylm-ingress")
    began = time.perf_counter()
    for _ in range(1000):  # past one export batch (512): the worker is woken, and fails to connect
        down.end(down.start("request", GOOD, kind="server"))
    requests_s = time.perf_counter() - began
    down.flush(timeout_s=0.2)  # the SDK's flush would wait out the exporter's retries (1 s, 2 s, ...)
    down.shutdown(timeout_s=0.2)
    waited_s = time.perf_counter() - began - requests_s
    print(f"1000 spans ended in {requests_s * 1e3:.1f} ms; flush + shutdown waited {waited_s:.2f} s")
    assert requests_s < 0.5 and waited_s < 1.0  # unbounded, the SDK's first retry alone waits 1 s


def test_the_gen_ai_names_are_opentelemetry_s():
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes

    names = [name for name in tracing.__all__ if name.startswith("GEN_AI_")]
    assert {name: getattr(tracing, name) for name in names} == {name: getattr(gen_ai_attributes, name)
                                                                 for name in names}
