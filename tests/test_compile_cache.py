"""The on-disk cache of compiled object code (engine/objcache.py) and packed.py's use of it.

The entries' format, staleness and atomic writes need no compiler; the round trips compile
packed.py's products for this machine's own CPU (its name and features as LLVM reports them),
which any x86-64 CPU with FMA runs, so they do not need AVX-512 either."""

import threading

import numpy
import pytest

from charnn.engine import packed
from charnn.engine.objcache import ObjectCache


def _host():
    """(cpu, features) of this machine for llvmlite, or a skip."""
    llvm = pytest.importorskip("llvmlite.binding")
    llvm.initialize_native_target()
    features = llvm.get_host_cpu_features()
    if not features.get("fma") or "x86_64" not in llvm.get_default_triple():
        pytest.skip("the generated products need an x86-64 CPU with FMA")
    return llvm.get_host_cpu_name(), features.flatten()


class Counting(packed.CodeGen):
    """A CodeGen that counts its compilations (the cache's misses)."""

    compiled = 0

    def object_code(self, M, K, N):
        self.compiled += 1
        return super().object_code(M, K, N)


def _run(fn, M, K, N, seed=0):
    rng = numpy.random.default_rng(seed)
    W = rng.normal(size=(M, K)).astype(numpy.float32)
    B = rng.normal(size=(K, N)).astype(numpy.float32)
    C = numpy.zeros((M, N), dtype=numpy.float32)
    Wp = packed.packed(W, N)  # held here: the product reads it through a raw pointer
    fn(Wp.ctypes.data, B.ctypes.data, N, C.ctypes.data, N)
    return C, W.astype(numpy.float64) @ B


KEY = {"what": "test", "shape": [3, 4, 5]}


def test_entry_round_trip(tmp_path):
    cache = ObjectCache(tmp_path / "new")  # made on the first store
    assert cache.load(KEY) is None
    assert cache.store(KEY, b"\x7fELF code\n\x00with newlines\n")
    assert cache.load(KEY) == b"\x7fELF code\n\x00with newlines\n"
    assert cache.load({**KEY, "shape": [3, 4, 6]}) is None
    assert [p.name for p in (tmp_path / "new").iterdir()] == [cache.path(KEY).name]  # no temporary left


def test_stale_or_corrupt_entries_read_as_missing(tmp_path):
    cache = ObjectCache(tmp_path)
    other = {**KEY, "features": "+avx2"}
    cache.store(KEY, b"the code")
    cache.store(other, b"the code")
    good = cache.path(KEY).read_bytes()
    for bad in (good[:-1],  # cut short
                good[:-1] + b"X",  # altered
                good.replace(b"charnn compiled object", b"charnn compiled objekt"),  # another format
                b"",
                cache.path(other).read_bytes()):  # another key's entry under this key's name
        cache.path(KEY).write_bytes(bad)
        assert cache.load(KEY) is None, bad
    cache.path(KEY).unlink()
    cache.path(KEY).mkdir()  # not even a file
    assert cache.load(KEY) is None


def test_a_folder_that_cannot_be_written_is_no_error(tmp_path):
    (tmp_path / "file").write_text("")
    cache = ObjectCache(tmp_path / "file" / "cache")
    assert not cache.store(KEY, b"code")
    assert cache.load(KEY) is None


def test_racing_writers_leave_whole_entries(tmp_path):
    cache = ObjectCache(tmp_path)
    payloads = [bytes([i]) * 200_000 for i in range(4)]
    seen, stop = [], threading.Event()

    def write(p):
        for _ in range(20):
            assert cache.store(KEY, p)

    def read():
        while not stop.is_set():
            seen.append(cache.load(KEY))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    assert all(s is None or s in payloads for s in seen)
    assert cache.load(KEY) in payloads
    assert len(list(tmp_path.iterdir())) == 1


def test_the_key_changes_with_the_cpu_the_sources_and_the_versions():
    versions = {"llvmlite": "0.50.0", "llvm": "22.1.0", "triple": "x86_64-unknown-linux-gnu", "numba": "0.68.1"}
    base = packed.product_key(1024, 256, 1, "znver4", "+avx512f,+fma", "a" * 64, versions)
    cache = ObjectCache("/nowhere")
    changed = [packed.product_key(1024, 256, 1, "znver4", "-avx512f,+fma", "a" * 64, versions),
               packed.product_key(1024, 256, 1, "skylake-avx512", "+avx512f,+fma", "a" * 64, versions),
               packed.product_key(1024, 256, 1, "znver4", "+avx512f,+fma", "b" * 64, versions),
               packed.product_key(1024, 256, 1, "znver4", "+avx512f,+fma", "a" * 64, {**versions, "llvmlite": "0.51.0"}),
               packed.product_key(1024, 256, 1, "znver4", "+avx512f,+fma", "a" * 64, {**versions, "numba": "0.69.0"}),
               packed.product_key(256, 1024, 1, "znver4", "+avx512f,+fma", "a" * 64, versions)]
    paths = {cache.path(k) for k in changed}
    assert len(paths) == len(changed) and cache.path(base) not in paths
    assert packed.product_key(1024, 256, 1, "znver4", "+avx512f,+fma", "a" * 64, dict(versions)) == base


def test_codegen_key_names_this_cpu_and_the_engine_sources():
    cpu, features = _host()
    gen = packed.CodeGen(cpu, features)
    from charnn.engine import SOURCE_DIGEST

    key = gen.key(64, 32, 16)
    assert key["cpu"] == cpu and key["features"] == features and key["source"] == SOURCE_DIGEST
    assert gen.key(64, 32, 16, source="0" * 64) != key


@pytest.mark.parametrize("M,K,N", [(70, 9, 3), (40, 12, 16)])  # lanes over rows, and over the streams
def test_a_product_from_the_cache_computes_as_a_fresh_one(tmp_path, M, K, N):
    cpu, features = _host()
    first = Counting(cpu, features, ObjectCache(tmp_path))
    fresh, want = _run(first.product(M, K, N), M, K, N)
    assert first.compiled == 1 and first.cache.path(first.key(M, K, N)).is_file()
    assert numpy.abs(fresh - want).max() <= 1e-5 * numpy.abs(want).max()
    later = Counting(cpu, features, ObjectCache(tmp_path))  # another process, as it were
    cached, _ = _run(later.product(M, K, N), M, K, N)
    assert later.compiled == 0
    numpy.testing.assert_array_equal(cached, fresh)


def test_a_corrupt_or_stale_entry_is_compiled_again_and_rewritten(tmp_path):
    cpu, features = _host()
    gen = Counting(cpu, features, ObjectCache(tmp_path))
    want, _ = _run(gen.product(30, 7, 5), 30, 7, 5)
    path = gen.cache.path(gen.key(30, 7, 5))
    good = path.read_bytes()
    stale = ObjectCache(tmp_path / "other")
    stale.store(gen.key(30, 7, 5, source="0" * 64), good[-200:])  # an entry of other sources
    for bad in (good[: len(good) // 2], stale.path(gen.key(30, 7, 5, source="0" * 64)).read_bytes()):
        path.write_bytes(bad)
        gen = Counting(cpu, features, ObjectCache(tmp_path))
        got, _ = _run(gen.product(30, 7, 5), 30, 7, 5)
        assert gen.compiled == 1
        numpy.testing.assert_array_equal(got, want)
        assert gen.cache.load(gen.key(30, 7, 5)) is not None  # rewritten whole


def test_without_a_cache_every_generator_compiles(tmp_path):
    cpu, features = _host()
    for _ in range(2):
        gen = Counting(cpu, features, None)
        got, want = _run(gen.product(9, 3, 1), 9, 3, 1)
        assert gen.product(9, 3, 1) is gen.product(9, 3, 1)  # loaded once per generator
        assert gen.compiled == 1
        assert numpy.abs(got - want).max() <= 1e-5 * numpy.abs(want).max()
    assert not any(tmp_path.iterdir())


def test_one_generator_holds_products_of_several_shapes(tmp_path):
    cpu, features = _host()
    gen = packed.CodeGen(cpu, features, ObjectCache(tmp_path))
    shapes = [(20, 5, 1), (20, 5, 3), (33, 8, 16)]
    fns = [gen.product(*s) for s in shapes]
    for fn, (M, K, N) in zip(fns, shapes):
        got, want = _run(fn, M, K, N, seed=M + N)
        assert numpy.abs(got - want).max() <= 1e-5 * numpy.abs(want).max()
