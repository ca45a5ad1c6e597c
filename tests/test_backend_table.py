"""backend="auto"'s measured table: written to the user's cache for this CPU model, read from there
before the shipped default, which stays untouched; and the dispatch object's batched-decode kernel."""
import hashlib
import json

import pytest
from gguf import GGMLQuantizationType as T

from weightstream.kernels import backends

SHIPPED = (backends.SHIPPED_TABLE, backends.SHIPPED_TABLE_AVX2)


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSTREAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backends, "_table", None)
    yield tmp_path / "cache"
    backends._table = None  # the next test reads the tables afresh


def test_written_table_goes_to_the_user_cache_and_choose_follows_it(user_cache):
    shipped = [hashlib.sha256(t.read_bytes()).hexdigest() for t in SHIPPED]
    default = backends.choose(T.Q4_K, 1)  # from the shipped table: no user table yet
    other = next(b for b in backends.available(T.Q4_K) if b != default)
    path = backends.write_table({"Q4_K": {"1": other}}, [], {"cpu": "test"})

    assert path.parent == user_cache and path.name.startswith("backend_table-")
    assert json.loads(path.read_text())["cpu_model"] == backends.cpu_model()
    assert [p.name for p in user_cache.iterdir()] == [path.name]  # no temporary file left behind
    assert backends.choose(T.Q4_K, 1) == other
    backends._table = None  # a fresh process reads it back from the cache
    assert backends.choose(T.Q4_K, 1) == other
    assert [hashlib.sha256(t.read_bytes()).hexdigest() for t in SHIPPED] == shipped


def test_many_kernel_is_the_chosen_backends_batched_decode_or_none():
    cython = backends.REGISTRY["cython"]
    if not cython.supports(T.Q4_K):
        pytest.skip("the Cython kernels are not built here")
    from weightstream.kernels import _kquants

    assert backends.KernelCache("cython").many_kernel(T.Q4_K) == _kquants.matvec_many_into
    assert backends.KernelCache("cython").many_kernel(T.Q4_0) is None  # _legacy has none
    assert backends.KernelCache("numpy").many_kernel(T.Q4_K) is None


@pytest.mark.parametrize("isa,table", [("avx2", "backend_table_avx2.json"), ("avx512", "backend_table.json"),
                                       ("scalar", "backend_table.json")])
def test_the_shipped_table_is_the_one_for_the_kernels_isa(isa, table, user_cache, monkeypatch):
    _kquants = pytest.importorskip("weightstream.kernels._kquants")
    monkeypatch.setattr(_kquants, "ISA", isa)
    assert backends.shipped_table().name == table
    expected = json.loads(backends.shipped_table().read_text())["best"]["Q4_K"]["512"].split(",")
    assert backends.choose(T.Q4_K, 512) in expected  # no user table: the shipped one decides
    if isa == "avx2":
        assert backends.choose(T.Q4_K, 512) == "cython"


@pytest.mark.parametrize("table", SHIPPED, ids=lambda p: p.name)
def test_shipped_tables_name_every_type_and_bucket_and_only_known_backends(table):
    best = json.loads(table.read_text())["best"]
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q8_0"):
        assert sorted(best[name], key=int) == [str(b) for b in backends.N_BUCKETS], (table.name, name)
        for entry in best[name].values():
            assert set(entry.split(",")) <= set(backends.BACKENDS) - {"auto"}, (table.name, name, entry)
