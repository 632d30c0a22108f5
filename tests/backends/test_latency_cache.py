"""LatencyCache: keys, round trips, damaged entries, and concurrent writers."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
from pathlib import Path

import pytest

import fxprune
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


# ------------------------------------------------------------- measurements: schema, ranges


def _stable(median: float = 1.25, spread: float = 0.05) -> Measurement:
    return Measurement(
        median_ms=median,
        p10_ms=median * (1 - spread / 2),
        p90_ms=median * (1 + spread / 2),
        rel_spread=spread,
        samples=(median * (1 - spread / 2), median, median * (1 + spread / 2)),
        stable=True,
        backend_id="onnxruntime-cpu#0123456789ab",
    )


def _unstable(median: float, spread: float) -> Measurement:
    return dataclasses.replace(_stable(median, spread), stable=False)


class Meter:
    """Hands out the given measurements in turn, counting the calls."""

    def __init__(self, *figures: Measurement) -> None:
        self.figures = list(figures)
        self.calls = 0

    def __call__(self) -> Measurement:
        self.calls += 1
        return self.figures.pop(0)


def _put_raw(cache: LatencyCache, value: dict) -> Path:
    """An entry with a valid checksum holding ``value`` as it is (what a hand edit or a bug
    in an older version could leave)."""
    cache.put(op_key(), value)
    return cache.path / f"{key_digest(op_key())}.json"


def test_measurement_is_measured_once(cache: LatencyCache) -> None:
    meter = Meter(_stable())
    assert cache.get_measurement(op_key(), meter) == _stable()
    assert cache.get_measurement(op_key(), meter) == _stable()
    assert meter.calls == 1
    assert Measurement.from_dict(cache.get(op_key())) == _stable()


def _without(field: str) -> dict:
    d = _stable().to_dict()
    del d[field]
    return d


_IMPLAUSIBLE = {
    "missing median_ms": _without("median_ms"),
    "missing samples": _without("samples"),
    "missing stable": _without("stable"),
    "missing backend_id": _without("backend_id"),
    "negative median": {**_stable().to_dict(), "median_ms": -1.0, "p10_ms": -1.1},
    "zero median": {**_stable().to_dict(), "median_ms": 0.0, "p10_ms": 0.0},
    "an hour and more": {**_stable().to_dict(), "median_ms": 4e6, "p90_ms": 4e6},
    "median as a string": {**_stable().to_dict(), "median_ms": "1.25"},
    "median as a boolean": {**_stable().to_dict(), "median_ms": True},
    "p10 above the median": {**_stable().to_dict(), "p10_ms": 2.0},
    "negative spread": {**_stable().to_dict(), "rel_spread": -0.1},
    "no samples": {**_stable().to_dict(), "samples": []},
    "negative sample": {**_stable().to_dict(), "samples": [1.0, -1.0]},
    "huge sample": {**_stable().to_dict(), "samples": [1.0, 1e12]},
    "samples as a string": {**_stable().to_dict(), "samples": "1.0"},
    "stable as a string": {**_stable().to_dict(), "stable": "yes"},
    "backend_id as a number": {**_stable().to_dict(), "backend_id": 3},
    "round_ms negative": {**_stable().to_dict(), "round_ms": [-2.0]},
    "not a measurement": {"median_ms": 1.0},
}


@pytest.mark.parametrize("value", list(_IMPLAUSIBLE.values()), ids=list(_IMPLAUSIBLE))
def test_implausible_entry_is_a_miss_re_measured_and_overwritten(
    cache: LatencyCache, value: dict, caplog: pytest.LogCaptureFixture
) -> None:
    entry = _put_raw(cache, value)
    fresh = _stable(0.9)
    meter = Meter(fresh)
    with caplog.at_level(logging.WARNING, logger="fxprune.backends.cache"):
        assert cache.get_measurement(op_key(), meter) == fresh
    assert meter.calls == 1
    assert Measurement.from_dict(cache.get(op_key())) == fresh
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and entry.name in warned[0] and "measuring again" in warned[0]
    assert cache.get_measurement(op_key(), meter) == fresh  # now trusted: not measured again


def test_nan_entry_is_a_miss(cache: LatencyCache) -> None:
    entry = _put_raw(cache, _stable().to_dict())
    record = json.loads(entry.read_text())
    record["value"]["median_ms"] = float("nan")  # json.dumps writes NaN; the checksum cannot
    entry.write_text(json.dumps(record), encoding="utf-8")
    meter = Meter(_stable(0.9))
    assert cache.get_measurement(op_key(), meter) == _stable(0.9)
    assert meter.calls == 1


def test_corrupt_entry_is_rebuilt_by_get_measurement(cache: LatencyCache) -> None:
    entry = _put_raw(cache, _stable().to_dict())
    entry.write_text(entry.read_text()[:30], encoding="utf-8")
    meter = Meter(_stable(0.9))
    assert cache.get_measurement(op_key(), meter) == _stable(0.9)
    assert json.loads(entry.read_text())["value"] == _stable(0.9).to_dict()


def test_implausible_fresh_measurement_is_an_error_and_not_stored(cache: LatencyCache) -> None:
    bad = dataclasses.replace(_stable(), median_ms=-0.5)
    with pytest.raises(fxprune.FxpruneError, match=r"onnxruntime-cpu.*median_ms.*-0\.5"):
        cache.get_measurement(op_key(), Meter(bad))
    assert cache.get(op_key()) is None


def test_unstable_entry_is_re_measured_next_time(cache: LatencyCache) -> None:
    meter = Meter(_unstable(2.0, 0.4), _stable(1.5))
    assert cache.get_measurement(op_key(), meter) == _unstable(2.0, 0.4)
    assert cache.get_measurement(op_key(), meter) == _stable(1.5)  # a later run tries again
    assert meter.calls == 2
    assert cache.get_measurement(op_key(), meter) == _stable(1.5)  # stable: trusted from now
    assert meter.calls == 2


def test_unstable_entry_keeps_the_quieter_figure_and_is_accepted_after_n_tries(
    cache: LatencyCache, caplog: pytest.LogCaptureFixture
) -> None:
    quiet, noisy, noisier = _unstable(2.0, 0.2), _unstable(2.5, 0.3), _unstable(3.0, 0.5)
    meter = Meter(noisy, quiet, noisier)
    assert cache.get_measurement(op_key(), meter, tries=3) == noisy
    assert cache.get_measurement(op_key(), meter, tries=3) == quiet  # quieter: replaces it
    assert cache.get_measurement(op_key(), meter, tries=3) == quiet  # noisier: kept the quiet
    assert meter.calls == 3
    with caplog.at_level(logging.WARNING, logger="fxprune.backends.cache"):
        assert cache.get_measurement(op_key(), meter, tries=3) == quiet
    assert meter.calls == 3  # accepted after three measurements, not measured for ever
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "unstable" in warned[0] and "3 measurements" in warned[0]
    assert json.loads((cache.path / f"{key_digest(op_key())}.json").read_text())["tries"] == 3


def test_unstable_figure_can_be_taken_as_it_is(cache: LatencyCache) -> None:
    meter = Meter(_unstable(2.0, 0.4))
    assert cache.get_measurement(op_key(), meter, tries=1) == _unstable(2.0, 0.4)
    assert cache.get_measurement(op_key(), meter, tries=1) == _unstable(2.0, 0.4)
    assert meter.calls == 1
