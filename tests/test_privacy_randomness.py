"""Randomness sources: the production default is the secure source; keyed streams are pure
functions of (key, labels); seeded sources expose their seed; key files are private."""

from __future__ import annotations

import os
import stat
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from pipeline.privacy import randomness
from pipeline.privacy.randomness import (
    KeyFileError,
    create_key,
    keyed_source,
    load_key,
    secure_source,
    seeded_source,
)
from pipeline.privacy.samplers import discrete_gaussian, discrete_laplace


def test_production_default_is_the_secure_source(monkeypatch):
    calls = []
    real = randomness.secure_source

    def spy():
        src = real()
        calls.append(src)
        return src

    monkeypatch.setattr(randomness, "secure_source", spy)
    x = discrete_gaussian(Fraction(10), 1000)
    y = discrete_laplace(Fraction(3), 10)
    assert len(calls) == 2 and all(c.kind == "secure" for c in calls)
    assert calls[0].uint64s_drawn >= 1000 and x.shape == (1000,) and y.shape == (10,)


def test_measure_default_is_the_secure_source(monkeypatch, tmp_path):
    from pipeline.model.histogram import SparseHistogram
    from pipeline.model.spec import load_spec
    from pipeline.model.strategy import load_strategy
    from pipeline.privacy.measure import measure_shard

    calls = []
    real = randomness.secure_source
    monkeypatch.setattr(randomness, "secure_source", lambda: calls.append(1) or real())
    spec = load_spec("units")
    h = SparseHistogram.from_dense("block", np.array([[1, 2], [0, 3]]))
    measure_shard(tmp_path / "m.parquet", h, spec, load_strategy("census2020_units"), "block", 0, 2)
    assert calls == [1]


def test_secure_sources_are_distinct_and_uniform():
    a, b = secure_source(), secure_source()
    assert a.kind == "secure" and a.seed is None
    x, y = a.uint64(100_000), b.uint64(100_000)
    assert not np.array_equal(x[:4], y[:4])
    # each of the 64 bit positions is fair: binomial test at α = 1e-6 per bit (Bonferroni 64e-6)
    bits = ((x[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).sum(axis=0)
    for k in bits:
        assert stats.binomtest(int(k), x.size).pvalue > 1e-6


def test_keyed_source_is_a_pure_function_of_key_and_labels():
    key = os.urandom(32)
    a = keyed_source(key, "persons", "block", "7").uint64(1000)
    s = keyed_source(key, "persons", "block", "7")
    b = np.concatenate([s.uint64(1), s.uint64(499), s.uint64(500)])  # chunking does not matter
    assert np.array_equal(a, b)
    assert not np.array_equal(a, keyed_source(key, "persons", "block", "8").uint64(1000))
    assert not np.array_equal(a, keyed_source(key, "persons", "block7").uint64(1000))  # unambiguous labels
    assert not np.array_equal(a, keyed_source(os.urandom(32), "persons", "block", "7").uint64(1000))
    src = keyed_source(key, "x")
    assert src.kind == "keyed" and key.hex() not in repr(src) and "key" not in repr(src).lower().replace("keyed", "")
    with pytest.raises(ValueError):
        keyed_source(b"short", "x")
    # same noise on a retried shard
    assert np.array_equal(discrete_gaussian(Fraction(7, 3), 500, keyed_source(key, "s")),
                          discrete_gaussian(Fraction(7, 3), 500, keyed_source(key, "s")))


def test_seeded_source_exposes_its_seed_and_is_reproducible():
    s = seeded_source(42, "persons", "county", 3)
    assert s.kind == "seeded" and s.seed == 42 and "42" in repr(s)
    assert np.array_equal(s.uint64(10), seeded_source(42, "persons", "county", 3).uint64(10))
    assert not np.array_equal(seeded_source(42, "a").uint64(10), seeded_source(42, "b").uint64(10))
    assert randomness.seeded_source_for(42, "persons", "county", 3).uint64(10).tolist() == \
        seeded_source(42, "persons", "county", 3).uint64(10).tolist()


def test_below_and_randbelow_are_uniform():
    src = seeded_source(3)
    for bound in (1, 2, 3, 7, 10, 2**33 + 5):
        v = src.below(np.full(60_000, bound, dtype=np.int64))
        assert v.min() >= 0 and v.max() < bound
        if bound <= 10:
            counts = np.bincount(v, minlength=bound)
            assert stats.chisquare(counts).pvalue > 1e-6 or bound == 1
    mixed = src.below(np.array([1, 5, 2**62, 9], dtype=np.int64))
    assert (mixed < [1, 5, 2**62, 9]).all()
    with pytest.raises(ValueError):
        src.below(np.array([0]))
    big = [src.randbelow(10**30) for _ in range(2000)]
    assert max(big) < 10**30 and min(big) >= 0
    assert stats.chisquare(np.bincount([b * 5 // 10**30 for b in big], minlength=5)).pvalue > 1e-6
    assert 0 <= src.getrandbits(100) < 2**100


def test_key_file_is_private_and_never_overwritten(tmp_path):
    p = create_key(tmp_path / "run" / "noise.key")
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    key = load_key(p)
    assert len(key) == 32
    with pytest.raises(KeyFileError, match="already exists"):
        create_key(p)
    assert load_key(p) == key
    os.chmod(p, 0o644)
    with pytest.raises(KeyFileError, match="0600"):
        load_key(p)
    with pytest.raises(KeyFileError, match="not found"):
        load_key(tmp_path / "nope.key")
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"abc")
    os.chmod(bad, 0o600)
    with pytest.raises(KeyFileError, match="32 bytes"):
        load_key(bad)
