"""worker.telemetry and worker.exporter against a real Redis: throttled progress writes, restarts of a transfer,
counters, and the Prometheus text the exporter makes of them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.servers import RedisServer
from worker import telemetry
from worker.exporter import make_registry

MiB = 1 << 20
QUEUE_DB = 14


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url_for(QUEUE_DB), decode_responses=True)
    client.flushdb()
    telemetry._first_byte_seen.clear()  # every test starts job "j1" afresh in an emptied Redis
    yield client
    client.flushdb()
    client.close()


def _hset_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return int(stats.get("cmdstat_hset", {}).get("calls", 0))


def _meter(r: redis.Redis, size: int = 20 * MiB) -> telemetry.TransferMeter:
    return telemetry.TransferMeter(
        r,
        job_id="j1",
        step_id="s1",
        digest="sha256:" + "a" * 64,
        size=size,
        worker="w1@host",
        source_registry="src.example",
        destination_registry="dst.example",
    )


def _record(r: redis.Redis) -> dict[str, object] | None:
    raw = r.hget(telemetry.INFLIGHT, "j1/s1")
    return json.loads(str(raw)) if raw else None


def _calls(r: redis.Redis) -> int:
    return int(r.info("stats")["total_commands_processed"])


def test_a_short_transfer_costs_one_write(r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "FLUSH_SECONDS", 3600.0)  # a transfer shorter than the period
    meter = _meter(r)
    meter.start()  # the job's first transfer in this process: its time
    assert telemetry.job_meter(r, "j1")["first_byte"] > 0
    commands = _calls(r)
    meter.on_attempt(meter.digest)  # the first attempt writes nothing
    for _ in range(20 * 16):  # 20 MiB in 64 KiB chunks: 320 chunks
        meter.on_bytes(meter.digest, 64 * 1024)
    assert _calls(r) - commands == 1  # nothing per chunk (INFO counts itself)
    assert _record(r) is None  # too short to show in flight
    commands = _calls(r)
    meter.close()
    # the end: the byte counter, one command
    assert _calls(r) - commands == 1 + 1
    assert telemetry.inflight(r, "j1") == []
    (counter,) = [c for c in telemetry.counters(r) if c[0] == "transferred_bytes"]
    assert counter == (
        "transferred_bytes",
        {"source_registry": "src.example", "destination_registry": "dst.example"},
        20.0 * MiB,
    )
    # a second transfer of the job in this process does not write the job's first byte again
    other = _meter(r)
    commands = _calls(r)
    other.start()
    assert _calls(r) - commands == 1


def test_a_long_transfer_writes_once_per_period(r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "FLUSH_SECONDS", 0.2)
    meter = _meter(r)
    meter.start()
    before = _hset_calls(r)
    started = time.monotonic()
    while time.monotonic() - started < 1.0:  # 1 s of 64 KiB chunks every 10 ms: about 100 chunks
        meter.on_bytes(meter.digest, 64 * 1024)
        time.sleep(0.01)
    writes = _hset_calls(r) - before
    assert 3 <= writes <= 6, writes  # one per 0.2 s, however many chunks
    rec = _record(r)
    assert rec is not None and 0 < int(str(rec["bytes"])) <= meter.bytes and rec["worker"] == "w1@host"
    assert telemetry.inflight(r, "j1")[0]["digest"] == meter.digest
    assert telemetry.inflight(r, "other") == []
    meter.close()
    assert _record(r) is None


def test_a_new_attempt_counts_from_zero_but_moved_bytes_stay(r: redis.Redis) -> None:
    meter = _meter(r)
    meter.start()
    meter.on_attempt(meter.digest)
    meter.on_bytes(meter.digest, 3 * MiB)
    meter.flush()
    meter.on_attempt(meter.digest)  # the second attempt starts from 0
    rec = _record(r)
    assert rec is not None and rec["bytes"] == 0
    meter.on_bytes(meter.digest, MiB)
    meter.flush()
    rec = _record(r)
    assert rec is not None and rec["bytes"] == MiB
    # the first attempt's bytes count as retried: streamed, though no blob done holds them
    assert telemetry.job_meter(r, "j1")["retried"] == 3 * MiB
    p = telemetry.job_progress(r, "j1", {"s1": {"size": 20 * MiB, "status": "running"}})
    assert p["bytes_moved"] == 4 * MiB and p["bytes_in_flight"] == MiB


def test_job_progress_adds_bytes_in_flight_to_the_blobs_done(r: redis.Redis) -> None:
    meter = _meter(r, size=6 * MiB)
    meter.start()
    meter.on_bytes(meter.digest, 2 * MiB)
    meter.flush()
    blobs = {
        "s0": {"size": 4 * MiB, "status": "done"},
        "s1": {"size": 6 * MiB, "status": "running"},
        "s2": {"size": 2 * MiB, "status": "pending"},
    }
    first = telemetry.job_meter(r, "j1")["first_byte"]
    p = telemetry.job_progress(r, "j1", blobs, now=first + 2.0)
    assert p["bytes_done"] == 6 * MiB and p["bytes_in_flight"] == 2 * MiB
    assert p["rate_bytes_per_second"] == pytest.approx(MiB)  # 2 MiB moved in 2 s
    assert p["eta_seconds"] == pytest.approx(6.0)  # 6 MiB left at 1 MiB/s
    assert [(t["worker"], t["bytes"]) for t in p["transfers"]] == [("w1@host", 2 * MiB)]


def test_exporter_serves_the_counters_a_histogram_and_the_gauges(r: redis.Redis) -> None:
    telemetry.count_blob(r, "transferred", "dst.example")
    telemetry.count_blob(r, "transferred", "dst.example")
    telemetry.count_blob(r, "mounted", "dst.example")
    telemetry.count_images(r, ["done", "done", "up-to-date"])
    telemetry.count(r, "registry_throttled", registry="dst.example")
    telemetry.job_ended(r, "j1", "copy", "done", created=100.0, finished=145.0)
    telemetry.job_ended(r, "j1", "copy", "done", created=100.0, finished=999.0)  # counted once per job
    telemetry.job_ended(r, "j2", "copy", "failed", created=100.0, finished=105.0)
    meter = _meter(r)
    meter.on_bytes(meter.digest, 5)
    meter.flush()
    r.rpush("ferry.blobs", "t1", "t2")

    text = generate_latest(make_registry(r, ("ferry.blobs", "ferry.meta"))).decode()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    dst = ("destination_registry", "dst.example")
    assert got[("ferry_blobs_total", (dst, ("outcome", "transferred")))] == 2
    assert got[("ferry_blobs_total", (dst, ("outcome", "mounted")))] == 1
    assert got[("ferry_images_total", (("outcome", "done"),))] == 2
    assert got[("ferry_images_total", (("outcome", "up-to-date"),))] == 1
    assert got[("ferry_registry_throttled_total", (("registry", "dst.example"),))] == 1
    assert got[("ferry_jobs_total", (("kind", "copy"), ("state", "done")))] == 1
    assert got[("ferry_job_duration_seconds_count", (("kind", "copy"),))] == 2
    assert got[("ferry_job_duration_seconds_sum", (("kind", "copy"),))] == 50
    assert got[("ferry_job_duration_seconds_bucket", (("kind", "copy"), ("le", "10")))] == 1
    assert got[("ferry_job_duration_seconds_bucket", (("kind", "copy"), ("le", "60")))] == 2
    assert got[("ferry_job_duration_seconds_bucket", (("kind", "copy"), ("le", "+Inf")))] == 2
    assert got[("ferry_transfers_in_flight", (dst,))] == 1
    assert got[("ferry_transfer_bytes_in_flight", (dst,))] == 5
    assert got[("ferry_transferred_bytes_total", (dst, ("source_registry", "src.example")))] == 5
    assert got[("ferry_queue_length", (("queue", "ferry.blobs"),))] == 2
    assert got[("ferry_queue_length", (("queue", "ferry.meta"),))] == 0
    assert got[("ferry_tasks_unacknowledged", ())] == 0


def test_a_redis_outage_never_fails_the_transfer_it_meters() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # nothing listens there; no client-side retries, so the test is quick
    down = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    meter = _meter(down)
    for _ in range(3):
        meter.on_bytes(meter.digest, 8 * MiB)  # each one is due for a write, and each write fails
    meter.on_attempt(meter.digest)
    assert meter._unflushed == 24 * MiB  # kept for the next write that works
    with telemetry.metering(type("Hooks", (), {"on_bytes": None, "on_attempt": None})(), meter) as m:
        m.on_bytes(m.digest, 1)
