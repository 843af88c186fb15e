"""File-backed empirical mixtures (gsa_kernels/_scaleout/streamed.py): GaussianMixture.from_points of a
numpy.memmap or a .npy / .safetensors path streams the points block by block. Same results as
the in-memory mixture, bounded anonymous memory, save / load that keeps referring to the file."""
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import gsa_kernels as gk
from gsa_kernels._scaleout.streamed import StreamedMixture

# the cpu backend where built (the reference is the same merge over a slower kernel: ~12 s each)
BACKENDS = ["cpu"] if "cpu" in gk.available_backends() else ["reference"]


def _points(N=700, D=61, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(N, D, generator=gen) * 2 - 1


def _file_backed(tmp_path, pts, kind, logw, block_bytes):
    from safetensors.torch import save_file

    if kind == "npy":
        np.save(tmp_path / "p.npy", pts.numpy())
        src = str(tmp_path / "p.npy")
    elif kind == "safetensors":
        save_file({"a": torch.zeros(3), "points": pts}, str(tmp_path / "p.safetensors"))
        src = tmp_path / "p.safetensors"
    else:
        mm = np.memmap(tmp_path / "p.raw", dtype=np.float32, mode="w+", shape=tuple(pts.shape))
        mm[:] = pts.numpy()
        mm.flush()
        src = np.memmap(tmp_path / "p.raw", dtype=np.float32, mode="r", shape=tuple(pts.shape))
    key = "points" if kind == "safetensors" else None
    return gk.GaussianMixture.from_points(src, logw, block_bytes=block_bytes, key=key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["npy", "safetensors", "memmap"])
def test_file_backed_matches_in_memory(tmp_path, kind, backend):
    """Blocks of 50 points (14 blocks, the last partial) vs one in-memory mixture, at a one-hot,
    a few-hot and a dense sigma, per-sample sigma too: denoise, weights, logp, score."""
    pts = _points()
    logw = torch.randn(pts.shape[0], generator=torch.Generator().manual_seed(3))
    ref = gk.GaussianMixture.from_points(pts, logw)
    bb = 2 * 50 * pts.shape[1] * 4
    m = _file_backed(tmp_path, pts, kind, logw, bb)
    assert isinstance(m, StreamedMixture) and m.rows_per_block(torch.float32) == 50
    gen = torch.Generator().manual_seed(1)
    x = pts[torch.randint(0, pts.shape[0], (9,), generator=gen)] + 0.3 * torch.randn(9, pts.shape[1], generator=gen)
    for sigma in [0.05, 0.5, 3.0, torch.rand(9, generator=gen) * 5 + 0.01]:
        den_r, w_r = gk.mixture_denoise(x, sigma, ref, return_weights=True, backend=backend)
        den, w = gk.mixture_denoise(x, sigma, m, return_weights=True, backend=backend)
        torch.testing.assert_close(den, den_r, rtol=1e-5, atol=1e-5)
        assert (w.double() - w_r.double()).abs().sum(1).max().item() / 2 <= 1e-5
        torch.testing.assert_close(gk.mixture_logp(x, sigma, m, backend=backend),
                                   gk.mixture_logp(x, sigma, ref, backend=backend), rtol=1e-6, atol=1e-5)
        s2 = (sigma if isinstance(sigma, float) else sigma[:, None]) ** 2
        torch.testing.assert_close(m.score(x, sigma, backend=backend) * s2, ref.score(x, sigma, backend=backend) * s2,
                                   rtol=1e-5, atol=1e-5)


def test_float64_queries_and_half_file(tmp_path):
    """float64 x streams float64 blocks; a float16 file is read into float32 blocks."""
    pts = _points(200, 33)
    np.save(tmp_path / "h.npy", pts.half().numpy())
    m = gk.GaussianMixture.from_points(str(tmp_path / "h.npy"), block_bytes=2 * 64 * 33 * 8)
    ref = gk.GaussianMixture.from_points(pts.half().float())
    x = pts[:5] + 0.1
    torch.testing.assert_close(m.denoise(x, 0.2), ref.denoise(x, 0.2), rtol=1e-5, atol=1e-5)
    x64 = x.double()
    torch.testing.assert_close(m.denoise(x64, 0.2), ref.to(dtype=torch.float64).denoise(x64, 0.2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_share_one_mixture(tmp_path, backend):
    """Two threads call ops on one file-backed mixture at once, each streaming 14 blocks through
    block buffers: every result equals that of the same call made alone."""
    pts = _points()
    m = _file_backed(tmp_path, pts, "npy", None, 2 * 50 * pts.shape[1] * 4)
    gen = torch.Generator().manual_seed(5)
    xs = [pts[:16] + 0.3 * torch.randn(16, pts.shape[1], generator=gen) for _ in range(2)]
    calls = [lambda: m.denoise(xs[0], 0.5, backend=backend),
             lambda: m.denoise(xs[1], 3.0, return_weights=True, backend=backend)[1]]
    alone = [call() for call in calls]
    start = threading.Barrier(2)

    def repeat(i):
        start.wait()
        return [calls[i]() for _ in range(10)]

    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(repeat, range(2)))
    for i in range(2):
        for out in together[i]:
            torch.testing.assert_close(out, alone[i])


def test_save_load_refers_to_the_file(tmp_path):
    pts = _points(300, 20)
    np.save(tmp_path / "p.npy", pts.numpy())
    m = gk.GaussianMixture.from_points(str(tmp_path / "p.npy"), block_bytes=1 << 16)
    m.save(tmp_path / "m.safetensors")
    assert os.path.getsize(tmp_path / "m.safetensors") < 300 * 8 + 2000  # log weights + header only
    m2 = gk.GaussianMixture.load(tmp_path / "m.safetensors")
    assert isinstance(m2, StreamedMixture) and m2.block_bytes == 1 << 16
    x = pts[:4] + 0.05
    torch.testing.assert_close(m2.denoise(x, 0.3), m.denoise(x, 0.3))


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        gk.GaussianMixture.from_points(str(tmp_path / "missing.npy"))
    (tmp_path / "p.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=".npy or .safetensors"):
        gk.GaussianMixture.from_points(str(tmp_path / "p.txt"))
    np.save(tmp_path / "i.npy", np.zeros((4, 3), dtype=np.int32))
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        gk.GaussianMixture.from_points(str(tmp_path / "i.npy"))
    np.save(tmp_path / "p.npy", np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="block_bytes"):
        gk.GaussianMixture.from_points(str(tmp_path / "p.npy"), block_bytes=0)
    m = gk.GaussianMixture.from_points(str(tmp_path / "p.npy"))
    with pytest.raises(ValueError, match="features per sample"):
        m.denoise(torch.zeros(2, 5), 1.0)


def test_numpy_array_is_an_in_memory_mixture():
    pts = _points(50, 7).numpy()
    m = gk.GaussianMixture.from_points(pts)
    assert isinstance(m, gk.GaussianMixture) and m.means.data_ptr() == torch.from_numpy(pts).data_ptr()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon is read from /proc/self/status")
@pytest.mark.skipif("cpu" not in gk.available_backends(), reason="cpu backend not built")
def test_anonymous_memory_stays_under_the_block_budget(tmp_path):
    """A 200 MB points file, 16 MiB block budget: peak RssAnon while denoising (sampled by a
    thread) grows by less than budget + outputs + slack, far below the file size. Runs in a
    fresh process, so that nothing else this test session allocated moves the baseline."""
    path = tmp_path / "big.npy"
    N, D = 200 * 2**20 // (4 * 784), 784
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(N, D))
    for k0 in range(0, N, 8192):  # written in slices: this process stays small too
        mm[k0:k0 + 8192] = np.random.default_rng(k0).random((min(8192, N - k0), D), dtype=np.float32)
    mm.flush()
    del mm
    script = textwrap.dedent(f"""
        import threading, time, torch, gsa_kernels as gk
        torch.set_num_threads(1)
        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        m = gk.GaussianMixture.from_points({str(path)!r}, block_bytes=16 * 2**20)
        x = torch.rand(64, {D})
        m.denoise(x, 3.0, backend="cpu")  # warm-up: allocator pools, thread pools
        base, peak, done = anon(), [0], [False]
        def sample():
            while not done[0]:
                peak[0] = max(peak[0], anon()); time.sleep(0.002)
        t = threading.Thread(target=sample); t.start()
        for s in (0.01, 3.0, 30.0):
            m.denoise(x, s, backend="cpu")
        done[0] = True; t.join()
        print(peak[0] - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.split()[-1])
    # budget (16 MiB) + the kernel's [64, block] distance tile and per-call outputs + slack
    assert growth < 48 * 2**20, f"RssAnon grew by {growth / 2**20:.1f} MiB"
