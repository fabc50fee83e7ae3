"""Chunked (out-of-core) backend and the ScoreStore."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import selflabel as sl
from selflabel.backends.chunked import budget_for_rows
from selflabel.source import NpyFileSource, parse_bytes
from selflabel.synthetic import make_scores


@pytest.fixture(scope="module")
def scores64():
    return make_scores(1003, 17, kind="probs", temperature=4.0, dead=1, dead_margin=0.5, dtype=torch.float64,
                       seed=1)


@pytest.fixture(scope="module")
def npy(tmp_path_factory, scores64):
    path = tmp_path_factory.mktemp("chunked") / "scores.npy"
    np.save(path, scores64.numpy())
    return str(path)


@pytest.mark.parametrize("rows", [61, 250, 1003])  # 1003 = 16 x 61 + 27: a ragged last block
@pytest.mark.parametrize("algorithm", ["scaling", "log"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_equals_in_memory(npy, scores64, rows, algorithm, dtype):
    budget = budget_for_rows(NpyFileSource(npy), dtype, rows)
    ref = sl.sinkhorn_knopp(scores64, kind="probs", algorithm=algorithm, dtype=dtype, tol=1e-6, max_iter=5000)
    got = sl.sinkhorn_knopp(npy, kind="probs", backend="chunked", memory_budget=budget, algorithm=algorithm,
                            dtype=dtype, tol=1e-6, max_iter=5000)
    assert got.backend == "chunked" and got.converged
    if dtype == torch.float64:
        assert got.n_iter == ref.n_iter and torch.equal(got.labels, ref.labels)
        assert torch.allclose(got.log_v, ref.log_v, atol=1e-12) and torch.allclose(got.log_u, ref.log_u, atol=1e-12)
    else:  # float32 sums in another order: the same solution, possibly one check later or earlier
        assert abs(got.n_iter - ref.n_iter) <= 10 and (got.labels == ref.labels).float().mean() >= 0.999
        assert got.error <= 1e-6


@pytest.mark.parametrize("algorithm", ["scaling", "log"])
def test_one_row_blocks(npy, scores64, algorithm):
    budget = budget_for_rows(NpyFileSource(npy), torch.float64, 1)
    ref = sl.sinkhorn_knopp(scores64, kind="probs", algorithm=algorithm, tol=0, max_iter=4)
    got = sl.sinkhorn_knopp(npy, kind="probs", backend="chunked", memory_budget=budget, algorithm=algorithm,
                            tol=0, max_iter=4)
    assert torch.allclose(got.log_v, ref.log_v, atol=1e-12) and torch.allclose(got.log_u, ref.log_u, atol=1e-12)
    assert torch.equal(got.labels, ref.labels)


def test_sources_memmap_tensor_heads_and_half(tmp_path, scores64):
    ref = sl.sinkhorn_knopp(scores64, kind="probs", tol=1e-8)
    mm = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=np.float64, shape=tuple(scores64.shape))
    mm[:] = scores64.numpy()
    mm.flush()
    for src in (np.load(tmp_path / "m.npy", mmap_mode="r"), scores64, scores64.numpy()):
        got = sl.sinkhorn_knopp(src, kind="probs", memory_budget="80MB", tol=1e-8)
        assert got.backend == "chunked" and torch.equal(got.labels, ref.labels)
    heads = make_scores(400, 9, heads=3, dtype=torch.float64, seed=3)
    np.save(tmp_path / "h.npy", heads.numpy())
    got = sl.sinkhorn_knopp(str(tmp_path / "h.npy"), backend="chunked", memory_budget="70MB", tol=1e-9)
    assert got.labels.shape == (3, 400)
    assert torch.equal(got.labels, sl.sinkhorn_knopp(heads, tol=1e-9).labels)
    half = scores64.to(torch.float16).numpy()
    np.save(tmp_path / "f16.npy", half)
    got = sl.sinkhorn_knopp(str(tmp_path / "f16.npy"), kind="logits", backend="chunked", memory_budget="80MB")
    assert torch.equal(got.labels, sl.sinkhorn_knopp(torch.from_numpy(half).float(), kind="logits").labels)


def test_bad_inputs(tmp_path, npy):
    with pytest.raises(FileNotFoundError, match="no such file"):
        sl.sinkhorn_knopp(tmp_path / "missing.npy", backend="chunked")
    np.save(tmp_path / "int.npy", np.ones((10, 3), dtype=np.int32))
    with pytest.raises(TypeError, match="int32"):
        sl.sinkhorn_knopp(tmp_path / "int.npy", backend="chunked")
    np.save(tmp_path / "vec.npy", np.ones(10))
    with pytest.raises(ValueError, match=r"expected \(N, K\)"):
        sl.sinkhorn_knopp(tmp_path / "vec.npy", backend="chunked")
    np.save(tmp_path / "f.npy", np.asfortranarray(np.ones((10, 3))))
    with pytest.raises(ValueError, match="Fortran"):
        sl.sinkhorn_knopp(tmp_path / "f.npy", backend="chunked")
    with open(npy, "rb") as fh:
        (tmp_path / "cut.npy").write_bytes(fh.read()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        sl.sinkhorn_knopp(tmp_path / "cut.npy", backend="chunked")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file at all")
    with pytest.raises(ValueError, match="not a valid .npy"):
        sl.sinkhorn_knopp(tmp_path / "junk.npy", backend="chunked")
    with pytest.raises(ValueError, match="too small for one row"):
        sl.sinkhorn_knopp(npy, kind="probs", backend="chunked", memory_budget="1MB")
    with pytest.raises(ValueError, match="applies to backend='chunked'"):
        sl.sinkhorn_knopp(npy, kind="probs", backend="cpu", memory_budget="1GB")
    bad = np.load(npy)
    bad[500, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="row 500"):
        sl.sinkhorn_knopp(tmp_path / "nan.npy", kind="probs", backend="chunked", memory_budget="80MB")


@pytest.mark.parametrize("text,value", [("512MB", 512 * 10**6), ("2GiB", 2 * 2**30), (1000, 1000), ("1.5kb", 1500)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "-5MB", 0, "12 parsecs", True])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="memory_budget"):
        parse_bytes(text)


def test_score_store_roundtrip_and_heads(tmp_path):
    data = np.random.default_rng(0).random((3, 50, 7)).astype(np.float32)
    with sl.ScoreStore(tmp_path / "s.npy", n=50, k=7, heads=3) as store:
        for lo in range(0, 50, 16):
            store.append(torch.from_numpy(data[:, lo:lo + 16]))
    assert np.array_equal(np.load(tmp_path / "s.npy"), data)
    with sl.ScoreStore(tmp_path / "one.npy", n=50, k=7, dtype=np.float16) as store:
        store.append(data[0])
    assert np.array_equal(np.load(tmp_path / "one.npy"), data[0].astype(np.float16))
    assert sorted(os.listdir(tmp_path)) == ["one.npy", "s.npy"]


def test_score_store_interrupted_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError), sl.ScoreStore(tmp_path / "s.npy", n=100, k=4) as store:
        store.append(np.ones((40, 4)))
        raise RuntimeError("dataloader crashed")
    assert os.listdir(tmp_path) == []
    store = sl.ScoreStore(tmp_path / "s.npy", n=100, k=4)
    store.append(np.ones((40, 4)))
    with pytest.raises(ValueError, match="40 of 100 rows"):
        store.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="block must have shape"):
        sl.ScoreStore(tmp_path / "x.npy", n=10, k=4).append(np.ones((5, 3)))


@pytest.fixture(scope="module")
def big_npy(tmp_path_factory):
    """400 MB of float32 scores (200,000 x 500), 4x the budget of the memory tests."""
    path = tmp_path_factory.mktemp("big") / "big.npy"
    n, k = 200_000, 500
    with sl.ScoreStore(path, n=n, k=k) as store:
        for lo in range(0, n, 50_000):
            store.append(make_scores(50_000, k, seed=lo))
    return path


@pytest.mark.parametrize("source", ["path", "mm", "mm[1:]", "mm_c", "mm[::-1]", "mm[:, :400]"])
def test_peak_memory_stays_within_budget(big_npy, source):
    """A file 4x larger than the budget, solved in its own process: peak RSS growth <= budget + slack,
    whether it is given as a path, a memmap, a slice of one, a copy-on-write map or a strided view."""
    budget = 100 * 2**20
    make = {"path": "p", "mm": "np.load(p, mmap_mode='r')", "mm[1:]": "np.load(p, mmap_mode='r')[1:]",
            "mm_c": "np.load(p, mmap_mode='c')", "mm[::-1]": "np.load(p, mmap_mode='r')[::-1]",
            "mm[:, :400]": "np.load(p, mmap_mode='r')[:, :400]"}[source]
    code = textwrap.dedent(f"""
        import numpy as np, torch, selflabel as sl

        def peak_rss():  # this process's high-water RSS (ru_maxrss would carry the parent's over fork)
            with open('/proc/self/status') as fh:
                return next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith('VmHWM'))

        torch.set_num_threads(2)
        p = {str(big_npy)!r}
        src = {make}
        base = peak_rss()
        res = sl.sinkhorn_knopp(src, backend="chunked", memory_budget={budget}, tol=0, max_iter=3)
        peak = peak_rss()
        print(base, peak, res.n_iter, int(res.labels.shape[0]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    base, peak, n_iter, n_labels = (int(x) for x in proc.stdout.split())
    assert n_iter == 3 and n_labels == 200_000 - (source == "mm[1:]")
    assert os.path.getsize(big_npy) > 3 * budget
    grew = (peak - base) / 2**20
    assert peak - base <= budget + 64 * 2**20, f"grew {grew:.0f} MiB for a {budget / 2**20:.0f} MiB budget"


def test_written_copy_on_write_map_is_read_as_written(tmp_path, scores64):
    """A mode 'c' memmap whose pages were written differs from its file: it is solved as written."""
    np.save(tmp_path / "s.npy", scores64.numpy())
    mm = np.load(tmp_path / "s.npy", mmap_mode="c")
    mm[:500] = mm[:500, ::-1]  # in this process only
    ref = sl.sinkhorn_knopp(np.array(mm), kind="probs", tol=1e-9)
    got = sl.sinkhorn_knopp(mm, kind="probs", backend="chunked", memory_budget="80MB", tol=1e-9)
    assert torch.equal(got.labels, ref.labels)
    assert not torch.equal(got.labels, sl.sinkhorn_knopp(scores64, kind="probs", tol=1e-9).labels)


def test_callable_chunk_source(scores64):
    blocks = [scores64[lo:lo + 100] for lo in range(0, 1003, 100)]
    calls = []

    def source():
        calls.append(1)
        return iter(blocks)

    ref = sl.sinkhorn_knopp(scores64, kind="probs", tol=1e-9)
    got = sl.sinkhorn_knopp(source, kind="probs", backend="chunked", memory_budget="80MB", tol=1e-9)
    assert torch.equal(got.labels, ref.labels) and got.n_iter == ref.n_iter
    assert len(calls) == got.n_iter + 3  # shape discovery, validation, one per iteration, labels
    with pytest.raises(ValueError, match="no blocks"):
        sl.sinkhorn_knopp(lambda: iter([]), backend="chunked")
    with pytest.raises(ValueError, match="share H and K"):
        sl.sinkhorn_knopp(lambda: iter([torch.randn(5, 3), torch.randn(5, 4)]), backend="chunked")
    shrinking = iter([[torch.randn(5, 3)] * 2] + [[torch.randn(5, 3)]] * 100)
    with pytest.raises(ValueError, match="later pass"):
        sl.sinkhorn_knopp(lambda: iter(next(shrinking)), backend="chunked", tol=0, max_iter=2)


def test_sliced_memmap_reads_the_slice(tmp_path):
    heads = make_scores(400, 8, heads=2, dtype=torch.float64, seed=5)
    np.save(tmp_path / "h.npy", heads.numpy())
    mm = np.load(tmp_path / "h.npy", mmap_mode="r")
    for part, ref in ((mm[1], heads[1]), (mm[0, 200:], heads[0, 200:])):
        got = sl.sinkhorn_knopp(part, backend="chunked", memory_budget="70MB", tol=1e-9)
        assert torch.equal(got.labels, sl.sinkhorn_knopp(ref, tol=1e-9).labels)


def test_score_store_file_mode_follows_umask(tmp_path):
    with sl.ScoreStore(tmp_path / "s.npy", n=2, k=2) as store:
        store.append(np.ones((2, 2)))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "s.npy").st_mode & 0o777 == 0o666 & ~umask


def test_callable_source_rejects_changing_heads():
    passes = iter([[torch.randn(2, 5, 3)], [torch.randn(2, 5, 3)]] + [[torch.randn(5, 3)]] * 50)
    with pytest.raises(ValueError, match="later pass"):
        sl.sinkhorn_knopp(lambda: iter(next(passes)), backend="chunked", tol=0, max_iter=3)


def test_bfloat16_storage_from_a_tensor_and_a_chunk_function(scores64):
    """bfloat16 scores (no .npy dtype, so tensors and chunk functions) solve in float32 like
    their upcast copy in memory."""
    bf = scores64.log().bfloat16()
    budget = budget_for_rows(sl.source.TensorSource(bf), torch.float32, 100)
    # plain iterations: chunked mode checks its scaling duals exactly and goes on in the log domain, a
    # path whose over-relaxed iterates after 30 steps differ from the in-memory scaling form's
    ref = sl.sinkhorn_knopp(bf.float(), kind="log_probs", tol=0, max_iter=30, acceleration="none")
    for source in (bf, lambda: iter([bf[:500], bf[500:]])):
        got = sl.sinkhorn_knopp(source, kind="log_probs", backend="chunked", memory_budget=budget, tol=0,
                                max_iter=30, acceleration="none")
        assert got.log_v.dtype == torch.float32 and torch.allclose(got.log_v, ref.log_v, atol=1e-5)
        assert (got.labels == ref.labels).float().mean() >= 0.999


def test_chunk_function_blocks_longer_than_the_budget_are_split(scores64):
    """A chunk function may yield blocks of any length; float16 ones are cast into a buffer
    sized by the budget, so the feed splits them first (also on CPU)."""
    half = scores64.half()
    blocks = lambda: iter([half[:400], half[400:1003]])  # noqa: E731
    budget = budget_for_rows(sl.source.CallableSource(blocks), torch.float32, 61)
    got = sl.sinkhorn_knopp(blocks, kind="probs", backend="chunked", memory_budget=budget, dtype=torch.float32,
                            tol=0, max_iter=20)
    ref = sl.sinkhorn_knopp(half.float(), kind="probs", tol=0, max_iter=20)
    assert torch.allclose(got.log_v, ref.log_v, atol=1e-5) and (got.labels == ref.labels).float().mean() >= 0.999


def test_later_passes_recompute_rows_inside_the_kernels(npy, monkeypatch):
    """Only the first pass (row shifts) runs prepare, which writes a kernel block; the
    iterations and the label pass hand the C++ kernels the raw blocks (ScoreBlock), and
    a file source leaves one core to its reader thread."""
    from selflabel.backends import ScoreBlock
    from selflabel.backends.cpu import CpuBackend

    calls = {"prepare": 0, "pass": 0, "threads": set()}
    prepare, scaling_pass, labels = CpuBackend.prepare, CpuBackend.scaling_pass, CpuBackend.labels

    def count_prepare(self, *args, **kw):
        calls["prepare"] += 1
        return prepare(self, *args, **kw)

    def count_pass(fn):
        def run(self, mat, *args, **kw):
            assert isinstance(mat, ScoreBlock)
            calls["pass"] += 1
            calls["threads"].add(self.threads)
            return fn(self, mat, *args, **kw)
        return run

    monkeypatch.setattr(CpuBackend, "prepare", count_prepare)
    monkeypatch.setattr(CpuBackend, "scaling_pass", count_pass(scaling_pass))
    monkeypatch.setattr(CpuBackend, "labels", count_pass(labels))
    budget = budget_for_rows(NpyFileSource(npy), torch.float64, 250)  # 1003 rows: 5 blocks
    sl.sinkhorn_knopp(npy, kind="probs", backend="chunked", memory_budget=budget, algorithm="scaling", tol=0,
                      max_iter=3)
    assert calls["prepare"] == 5 and calls["pass"] == 5 * 3 + 5
    assert calls["threads"] == {max(1, torch.get_num_threads() - 1)}


def test_block_rows_cap_by_device():
    from selflabel.backends.chunked import CPU_BLOCK_BYTES, CUDA_BLOCK_BYTES, cap_block_rows

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # only the type is read: no GPU needed
    assert cap_block_rows(10**9, (2, 10**7, 1000), 4, cpu) == CPU_BLOCK_BYTES // 8000
    assert cap_block_rows(10**9, (2, 10**7, 1000), 4, cuda) == CUDA_BLOCK_BYTES // 8000
    assert cap_block_rows(100, (2, 10**7, 1000), 4, cuda) == 100  # the budget's rows when fewer
    assert cap_block_rows(100, (1, 10, 10**8), 8, cpu) == 1  # a row larger than the cap is still one row


def test_device_feed_splits_blocks_longer_than_its_buffers():
    from selflabel.backends.chunked import DeviceFeed

    feed = DeviceFeed(torch.device("cpu"), (2, 23, 3), rows=4, dtype=torch.float32)
    x = torch.arange(2 * 23 * 3, dtype=torch.float32).view(2, 23, 3)
    spans = [(0, 9), (9, 10), (10, 23)]  # a chunk function's own block sizes
    got = list(feed._split((lo, hi, x[:, lo:hi]) for lo, hi in spans))
    assert [(lo, hi) for lo, hi, _ in got] == [(0, 4), (4, 8), (8, 9), (9, 10), (10, 14), (14, 18), (18, 22),
                                               (22, 23)]
    for lo, hi, block in got:
        assert torch.equal(block, x[:, lo:hi])
