"""Out-of-core empirical mixture demo: N points in a .npy file larger than a block budget,
streamed by GaussianMixture.from_points(path). Prints the disk's raw read bandwidth (O_DIRECT
dd), the streaming reader's own bandwidth, the time per query batch at a few sigmas (cold: the
file's pages dropped from the page cache first; warm: cached), and the peak RssAnon.

    python scripts/empirical_out_of_core.py --n 1000000 --d 784 [--keep]

Writes /tmp/gsa_points_<N>x<D>.npy (N D 4 bytes) and deletes it afterwards unless --keep.
"""
import argparse
import os
import subprocess
import threading
import time

import numpy as np
import torch

import gsa_kernels as gk
from gsa_kernels._scaleout import streamed


def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024


class PeakAnon:
    def __enter__(self):
        self.peak, self.done = rss_anon(), False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.done:
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.005)

    def __exit__(self, *a):
        self.done = True
        self.t.join()


def drop_cache(path):
    """Evict the file's pages from the page cache (no root needed for one's own file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=784)
    p.add_argument("--b", type=int, default=256)
    p.add_argument("--sigmas", default="0.01,3,30")
    p.add_argument("--block-mb", type=int, default=256)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    N, D, B = args.n, args.d, args.b
    path = f"/tmp/gsa_points_{N}x{D}.npy"
    size = N * D * 4
    print(f"points: N={N} D={D} float32, {size / 1e9:.2f} GB at {path}; block budget {args.block_mb} MiB; "
          f"torch threads {torch.get_num_threads()}")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(N, D))
        rng = np.random.default_rng(0)
        for k0 in range(0, N, 65536):
            k1 = min(N, k0 + 65536)
            mm[k0:k1] = rng.random((k1 - k0, D), dtype=np.float32) * 2 - 1
        mm.flush()
        del mm
        print(f"wrote the file in {time.perf_counter() - t0:.1f} s")
    try:
        drop_cache(path)
        dd = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"],
                            capture_output=True, text=True)
        print("disk (dd, O_DIRECT, cold):", dd.stderr.strip().splitlines()[-1])

        m = gk.GaussianMixture.from_points(path, block_bytes=args.block_mb * 2**20)
        drop_cache(path)
        t0 = time.perf_counter()
        for _ in streamed._blocks(m._points, m._take_buffers(torch.float32)):
            pass
        t = time.perf_counter() - t0
        print(f"streaming reader alone (cold): {t:.2f} s, {size / t / 1e9:.2f} GB/s")

        gen = torch.Generator().manual_seed(1)
        idx = torch.randint(0, N, (B,), generator=gen).sort().values.numpy()
        x0 = torch.from_numpy(m._points.take(idx, np.float32))
        base = rss_anon()
        print(f"RssAnon before the queries: {base / 2**20:.0f} MiB")
        for s in [float(v) for v in args.sigmas.split(",")]:
            x = x0 + s * torch.randn(B, D, generator=gen)
            for state in ("cold", "warm"):
                if state == "cold":
                    drop_cache(path)
                with PeakAnon() as pk:
                    t0 = time.perf_counter()
                    m.denoise(x, s)
                    t = time.perf_counter() - t0
                print(f"sigma={s:g} B={B} {state}: {t:.2f} s per batch, points read at {size / t / 1e9:.2f} GB/s; "
                      f"peak RssAnon {pk.peak / 2**20:.0f} MiB (+{(pk.peak - base) / 2**20:.0f} MiB)")
    finally:
        if not args.keep:
            os.remove(path)


if __name__ == "__main__":
    main()
