"""The delta-mixture (empirical) score of a point set split across ranks.

    torchrun --nproc-per-node 2 examples/sharded_empirical_score.py

Each rank keeps one contiguous shard of the points (m.shard(rank, world): log weights stay
-log N, the whole set's) and its own batch of queries (the batch sizes differ on purpose);
gk.distributed.mixture_score returns the score of the WHOLE point set for each rank's own
queries. Here every rank draws the full set from one seed and keeps only its shard, so that
each rank can check its answer against the single-process op at the end; a real job loads
only its own slice. gloo on CPU tensors; CUDA tensors with init_process_group("nccl") work
unchanged.
"""
import torch
import torch.distributed as dist

import gsa_kernels as gk


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    N, D, sigma = 4096, 64, 0.3
    points = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    shard = gk.GaussianMixture.from_points(points).shard(rank, world)  # this rank's N / world points
    x = torch.randn(3 + rank, D, generator=torch.Generator().manual_seed(1 + rank))  # B = 3, 4, ...
    score = gk.distributed.mixture_score(x, sigma, shard)
    stats = gk.distributed.last_call_stats()
    full = gk.mixture_score(x, sigma, gk.GaussianMixture.from_points(points))
    err = ((score - full).norm() / full.norm()).item()
    print(f"rank {rank}/{world}: {shard.num_components} of {N} points, {x.shape[0]} queries, "
          f"score relative error vs one process {err:.1e}, sent {stats['bytes_sent']} B in {stats['collectives']} collectives",
          flush=True)
    ok = torch.tensor([err < 1e-5])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    dist.destroy_process_group()
    if not bool(ok):
        raise SystemExit("sharded score differs from the single-process one")


if __name__ == "__main__":
    main()
