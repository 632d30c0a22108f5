"""LatencyCache: keys, round trips, damaged entries, and concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from fxprune.backends import LatencyCache, Measurement, OnnxRuntimeBackend, key_digest
from fxprune.backends.cache import default_cache_dir

IDENTITY = OnnxRuntimeBackend(provider="cpu", threads=1).identity()


def op_key(**identity_overrides: str) -> dict:
    return {
        "op": "conv2d",
        "kernel": [3, 3],
        "stride": [1, 1],
        "groups": 1,
        "hw": [56, 56],
        "batch": 1,
        "cin": 64,
        "cout": 64,
        "dtype": "float32",
        "backend": {**IDENTITY, **identity_overrides},
    }


MEASUREMENT = Measurement(
    median_ms=1.25,
    p10_ms=1.2,
    p90_ms=1.4,
    rel_spread=0.16,
    samples=(1.2, 1.25, 1.4),
    stable=False,
    backend_id="onnxruntime-cpu#0123456789ab",
)


@pytest.fixture
def cache(tmp_path: Path) -> LatencyCache:
    return LatencyCache(tmp_path / "latency")


# ------------------------------------------------------------------------------------ keys


@pytest.mark.parametrize("field", sorted(IDENTITY))
def test_key_changes_with_every_identity_field(field: str) -> None:
    assert key_digest(op_key(**{field: IDENTITY[field] + "-changed"})) != key_digest(op_key())


@pytest.mark.parametrize(
    ("name", "value"), [("cin", 63), ("cout", 65), ("batch", 8), ("dtype", "float16")]
)
def test_key_changes_with_op_fields(name: str, value: object) -> None:
    assert key_digest({**op_key(), name: value}) != key_digest(op_key())


def test_key_ignores_insertion_order_and_tuple_vs_list() -> None:
    key = op_key()
    reordered = dict(reversed(list(key.items())))
    as_tuples = {**key, "kernel": (3, 3), "stride": (1, 1), "hw": (56, 56)}
    assert key_digest(reordered) == key_digest(key) == key_digest(as_tuples)
    assert len(key_digest(key)) == 64


# ------------------------------------------------------------------------------ round trip


def test_round_trip(cache: LatencyCache) -> None:
    assert cache.get(op_key()) is None
    assert len(cache) == 0
    cache.put(op_key(), MEASUREMENT.to_dict())
    got = cache.get(op_key())
    assert got is not None
    assert Measurement.from_dict(got) == MEASUREMENT
    assert len(cache) == 1
    assert op_key() in cache
    assert cache.get(op_key(threads="8")) is None
    files = list(cache.path.iterdir())
    assert [f.name for f in files] == [f"{key_digest(op_key())}.json"]
    record = json.loads(files[0].read_text())
    assert record["key"]["cin"] == 64
    assert set(record) == {"format", "key", "value", "value_sha256"}


def test_put_overwrites(cache: LatencyCache) -> None:
    cache.put(op_key(), {"median_ms": 1.0})
    cache.put(op_key(), {"median_ms": 2.0})
    assert cache.get(op_key()) == {"median_ms": 2.0}
    assert len(cache) == 1


def test_get_or_measure_measures_once(cache: LatencyCache) -> None:
    calls = []

    def measure() -> dict:
        calls.append(1)
        return {"median_ms": 0.5}

    assert cache.get_or_measure(op_key(), measure) == {"median_ms": 0.5}
    assert cache.get_or_measure(op_key(), measure) == {"median_ms": 0.5}
    assert len(calls) == 1


def test_get_or_measure_remeasures_rejected_values(cache: LatencyCache) -> None:
    def stable() -> bool:
        return cache.get(op_key())["stable"]

    cache.put(op_key(), {**MEASUREMENT.to_dict(), "stable": False})
    assert not stable()
    fresh = {**MEASUREMENT.to_dict(), "stable": True, "median_ms": 1.1}
    got = cache.get_or_measure(op_key(), lambda: fresh, accept=lambda v: v["stable"])
    assert got == fresh and stable()
    # accepted now: not measured again
    assert cache.get_or_measure(op_key(), dict, accept=lambda v: v["stable"]) == fresh


def test_len_and_clear(cache: LatencyCache) -> None:
    for cin in range(5):
        cache.put({**op_key(), "cin": cin}, {"median_ms": float(cin)})
    (cache.path / ".deadbeef.123.tmp").write_text("left behind by a killed writer")
    assert len(cache) == 5
    cache.clear()
    assert len(cache) == 0
    assert list(cache.path.iterdir()) == []
    LatencyCache(cache.path / "never-created").clear()  # no directory: nothing to do


def test_rejects_non_json_values(cache: LatencyCache) -> None:
    with pytest.raises(ValueError):
        cache.put(op_key(), {"median_ms": float("nan")})
    with pytest.raises(TypeError):
        cache.put(op_key(), {"median_ms": object()})
    assert len(cache) == 0


def test_default_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert LatencyCache().path == tmp_path / "env"
    monkeypatch.delenv("FXPRUNE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fxprune" / "latency"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fxprune" / "latency"


# ------------------------------------------------------------------------- damaged entries


def _damage_truncate(text: str) -> str:
    return text[: len(text) // 2]


def _damage_garbage(text: str) -> str:
    return "\x00\x01 not json at all \xff"


def _damage_empty(text: str) -> str:
    return ""


def _damage_value(text: str) -> str:
    record = json.loads(text)
    record["value"]["median_ms"] = 99.0  # checksum no longer matches
    return json.dumps(record)


def _damage_key(text: str) -> str:
    record = json.loads(text)
    record["key"]["cin"] = 63  # a different key under this key's name
    return json.dumps(record)


def _damage_shape(text: str) -> str:
    return json.dumps([1, 2, 3])


def _damage_format(text: str) -> str:
    record = json.loads(text)
    record["format"] = 999
    return json.dumps(record)


@pytest.mark.parametrize(
    "damage",
    [
        _damage_truncate,
        _damage_garbage,
        _damage_empty,
        _damage_value,
        _damage_key,
        _damage_shape,
        _damage_format,
    ],
)
def test_damaged_entry_is_a_miss_and_rebuilt(cache: LatencyCache, damage) -> None:
    entry = cache.path / f"{key_digest(op_key())}.json"

    def put_damaged() -> None:
        cache.put(op_key(), MEASUREMENT.to_dict())
        entry.write_text(damage(entry.read_text()), encoding="utf-8")

    put_damaged()
    assert cache.get(op_key()) is None
    assert not entry.exists()  # removed on read

    put_damaged()
    fresh = {"median_ms": 3.0}
    assert cache.get_or_measure(op_key(), lambda: fresh) == fresh
    assert cache.get(op_key()) == fresh
    assert json.loads(entry.read_text())["value"] == fresh


def test_binary_garbage_entry(cache: LatencyCache) -> None:
    cache.path.mkdir(parents=True)
    entry = cache.path / f"{key_digest(op_key())}.json"
    entry.write_bytes(bytes(range(256)))
    assert cache.get(op_key()) is None
    assert cache.get_or_measure(op_key(), lambda: {"median_ms": 1.0}) == {"median_ms": 1.0}


def test_unwritable_cache_warns_and_returns_value(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    cache = LatencyCache(blocker / "latency")
    with pytest.warns(RuntimeWarning, match="not updated"):
        assert cache.get_or_measure(op_key(), lambda: {"median_ms": 1.0}) == {"median_ms": 1.0}


# -------------------------------------------------------------------- concurrent writers

N_PROCS, N_WRITES = 4, 50


def _writer(path: str, proc: int) -> None:
    cache = LatencyCache(path)
    for i in range(N_WRITES):
        value = {"median_ms": float(proc * 1000 + i), "samples": list(range(50)), "proc": proc}
        cache.put({"shared": True}, value)  # every process fights over this entry
        cache.put({"shared": False, "proc": proc, "i": i}, value)
        cache.put({"half": i % 10}, value)  # a few entries shared by all, written often
        got = cache.get({"shared": True})
        assert got is None or got["samples"] == list(range(50))


def test_concurrent_writers_leave_every_entry_readable(tmp_path: Path) -> None:
    methods = mp.get_all_start_methods()
    # fork keeps the test fast (no re-import of torch in the children); spawn elsewhere.
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), p)) for p in range(N_PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * N_PROCS

    cache = LatencyCache(tmp_path)
    shared = cache.get({"shared": True})
    assert shared is not None and shared["proc"] in range(N_PROCS)
    for proc in range(N_PROCS):
        for i in range(N_WRITES):
            value = cache.get({"shared": False, "proc": proc, "i": i})
            assert value == {
                "median_ms": float(proc * 1000 + i),
                "samples": list(range(50)),
                "proc": proc,
            }
    for h in range(10):
        value = cache.get({"half": h})
        assert value is not None and value["median_ms"] % 1000 % 10 == h
    assert len(cache) == 1 + N_PROCS * N_WRITES + 10
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
