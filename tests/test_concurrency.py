"""Threads and processes: ops called from several Python threads at once (one shared model, or
one model per thread) give the single-threaded results; ops work in a child process after
fork (where plain torch does) and under spawn; the intra-op thread count does not change the
results beyond rounding."""
import multiprocessing as mp
import threading

import pytest
import torch

import gsa_kernels as gk
from tests._helpers import random_gaussian, random_mixture, requires_backend

pytestmark = requires_backend("cpu")

D = 48


def _models(seed=0):
    return (random_gaussian(D, 6, dtype=torch.float32, seed=seed),
            random_mixture(5, D, 3, dtype=torch.float32, seed=seed),
            random_mixture(40, D, 0, dtype=torch.float32, seed=seed))


def _run(models, x):
    """Every op family once, on the cpu backend; a trajectory long enough (>= 32 MiB) to take
    its output from the reused-buffer pool of csrc/cpu/output_memory.cpp."""
    g, m, e = models
    big = x.repeat(64, 1)  # [B * 64, D]; T = 10: 37 MB
    traj = gk.gaussian_trajectory(big, torch.linspace(2, 0, 10), g, backend="cpu")
    return [gk.gaussian_denoise(x, 0.4, g, backend="cpu"), gk.gaussian_score(x, 0.4, g, backend="cpu"),
            traj[:, ::97].clone(),
            *gk.mixture_denoise(x, 0.4, m, return_weights=True, backend="cpu"),
            gk.mixture_logp(x, 0.4, m, backend="cpu"), gk.mixture_denoise(x, 0.05, e, backend="cpu")]


def _x(seed=1):
    return torch.randn(300, D, generator=torch.Generator().manual_seed(seed)) * 2


def _assert_same(got, want, exact=True):
    for a, b in zip(got, want):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared", [True, False], ids=["shared model", "model per thread"])
def test_threads_give_single_threaded_results(shared):
    n = 4
    models = [_models(0 if shared else i) for i in range(n)]
    if shared:
        models = [models[0]] * n
    x = _x()
    want = [_run(_models(0 if shared else i), x) for i in range(n)]  # fresh models: no kept layouts
    got = [None] * n
    start = threading.Barrier(n)

    def work(i):
        start.wait()  # all threads build the shared model's layouts at once
        got[i] = [_run(models[i], x) for _ in range(3)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(n):
        assert got[i] is not None, f"thread {i} failed or hung"
        for rep in got[i]:
            _assert_same(rep, want[i])


def _child(conn, busy_thread_in_parent):
    try:
        torch.set_num_threads(1)
        plain = (torch.randn(300, 300) @ torch.randn(300, 300)).sum().item()  # plain torch works here
        # numpy arrays: torch's own pickling of tensors shares memory with this process, which exits
        conn.send(("ok", plain, [t.numpy() for t in _run(_models(), _x())]))
    except BaseException as e:  # report, do not hang the parent
        conn.send(("error", repr(e), None))
    conn.close()


def _in_child(method, busy=False):
    """Run _child under a start method; with busy, a parent thread keeps calling ops (holding the
    output pool's lock now and then) while the child is forked."""
    ctx = mp.get_context(method)
    parent_end, child_end = ctx.Pipe(duplex=False)
    stop = threading.Event()
    models, x = _models(), _x()

    def keep_busy():
        while not stop.is_set():
            _run(models, x)

    worker = threading.Thread(target=keep_busy) if busy else None
    if worker:
        worker.start()
    try:
        proc = ctx.Process(target=_child, args=(child_end, busy))
        proc.start()
        ready = parent_end.poll(180)
        status, info, arrays = parent_end.recv() if ready else ("hung", None, None)
        result = status, info, arrays and [torch.from_numpy(a) for a in arrays]
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    finally:
        stop.set()
        if worker:
            worker.join()
    return result


@pytest.mark.parametrize("busy", [False, True], ids=["idle parent", "parent busy in ops"])
def test_ops_after_fork(busy):
    want = _run(_models(), _x())  # the parent has used the ops (thread pool, buffer pool)
    status, info, got = _in_child("fork", busy)
    assert status == "ok", f"child after fork: {status} {info}"
    _assert_same(got, want, exact=False)  # the child runs with 1 intra-op thread


def test_ops_under_spawn():
    want = _run(_models(), _x())
    status, info, got = _in_child("spawn")
    assert status == "ok", f"spawned child: {status} {info}"
    _assert_same(got, want, exact=False)


def test_intra_op_thread_count_does_not_change_results():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(_models(), _x())
        torch.set_num_threads(2)
        two = _run(_models(), _x())
    finally:
        torch.set_num_threads(before)
    _assert_same(two, one, exact=False)
