"""Communication overhead of gk.distributed.mixture_denoise at equal total work.

    python benchmarks/bench_distributed.py [--points 20000] [--dim 3072] [--queries 256] [--reps 5]

For world sizes 1, 2 and 3 (gloo, one spawned process per rank, one thread each), the same
empirical mixture (points x dim, float32) is split into near-equal shards and the same total
batch of queries into near-equal per-rank batches; every rank times the call (median of reps,
after a barrier). Printed per world size: median seconds per call (slowest rank), of which the
local kernel, and the payload bytes each rank sent. This machine may have fewer cores than
ranks: read it as a measurement of what the collectives cost, not of a speed-up.
"""
import argparse
import datetime
import os
import statistics
import subprocess
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, args, init_file, out):
    import gsa_kernels as gk

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    points = torch.randn(args.points, args.dim, generator=torch.Generator().manual_seed(0))
    shard = gk.GaussianMixture.from_points(points).shard(rank, world)
    del points
    queries = torch.randn(args.queries, args.dim, generator=torch.Generator().manual_seed(1))
    lo = rank * (args.queries // world) + min(rank, args.queries % world)
    x = queries[lo:lo + args.queries // world + (rank < args.queries % world)].clone()
    gk.distributed.mixture_denoise(x, 0.5, shard)  # warm-up: caches, first-touch
    times, local = [], []
    for _ in range(args.reps):
        dist.barrier()
        t = time.perf_counter()
        gk.distributed.mixture_denoise(x, 0.5, shard)
        times.append(time.perf_counter() - t)
        local.append(gk.distributed.last_call_stats()["seconds_local"])
    st = gk.distributed.last_call_stats()
    row = torch.tensor([statistics.median(times), statistics.median(local), st["bytes_sent"], st["bytes_received"]], dtype=torch.float64)
    rows = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(rows, row)
    if rank == 0:
        torch.save(torch.stack(rows), out)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=3072)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--worlds", default="1,2,3")
    args = ap.parse_args()
    cpu = subprocess.run("lscpu | grep -E 'Model name|^CPU\\(s\\)'", shell=True, capture_output=True, text=True).stdout
    print(cpu.strip())
    print(f"empirical mixture N={args.points} D={args.dim} float32, {args.queries} queries in all, sigma=0.5, "
          f"gloo, 1 thread per rank, median of {args.reps}")
    print("| ranks | s / call (slowest rank) | of which local kernel | communication + merge | bytes sent per rank (max) |")
    print("|---|---|---|---|---|")
    for world in [int(w) for w in args.worlds.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.pt")
            mp.spawn(_worker, args=(world, args, os.path.join(tmp, "init"), out), nprocs=world)
            rows = torch.load(out)
        slow = int(rows[:, 0].argmax())
        t, loc = rows[slow, 0].item(), rows[slow, 1].item()
        print(f"| {world} | {t:.3f} | {loc:.3f} | {t - loc:.3f} ({100 * (t - loc) / t:.0f} %) | {int(rows[:, 2].max())} |", flush=True)


if __name__ == "__main__":
    main()
