"""The one-shot GPU check (scripts/gpu_check.sh is its entry point).

    scripts/gpu_check.sh OUT_DIR            on a machine with one NVIDIA GPU, no network
    scripts/gpu_check.sh --dry-run OUT_DIR  the same pipeline on a CPU-only machine (CI)

Parts, each a subprocess with its own time budget; a part that fails or runs out of time is
recorded and the next one runs:
  environment   GPU, driver, torch / triton versions, tools on PATH
  build         the extension in place for this GPU's architecture, all cores (ninja); the dry
                run only checks that the installed extension imports
  conformance   tests/conformance on CUDA tensors for backends triton and cuda
  compile       torch.compile(fullgraph=True) of every public op and torch.library.opcheck of
                the kernel-level ops, per backend, on the device
  sanitizer     compute-sanitizer memcheck / racecheck / synccheck over a small case subset
  bench         benchmarks/bench_gpu.py (pytest-benchmark, CUDA events) vs eager and compiled
  local         the local score machines (bench_gpu.py's test_gpu_local): local_denoise on the
                triton and cuda backends vs the conv2d formulation on the device, answers
                compared, times reported
Then OUT_DIR/gpu_check.md and OUT_DIR/gpu_check.json.

A run cannot report another run's results: it first removes its own outputs from OUT_DIR (the
files named in OUTPUTS) and reads a part's result file only if this run wrote it. Without
--dry-run and without a CUDA device visible to torch it stops at once with exit status 2 (the
CPU stand-ins would otherwise "pass" the GPU parts). A relative OUT_DIR is taken relative to the
caller's directory (gpu_check.sh passes it in GSA_GPU_CHECK_CALLER_DIR).

The dry run uses CPU tensors (Triton interpreter, CUDA SIMT emulation), reduced sizes, one timed
repetition, and no build (the installed extension, which CI's install built, serves it). Nothing
here needs the network, diffusers, k-diffusion or mlxtend.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# seconds per part on one H200 with 16 cores / in the dry run; the real run also stops starting
# parts at TOTAL_BUDGET (~9 minutes), each part's budget cut to what is left. The dry run does not
# build (part_build). The local
# part's estimate (not yet measured on a GPU): 3 Triton compilations, ~8 conv2d ELS-size calls of
# ~0.1-1 s per mode.
BUDGETS = {"environment": (20, 60), "build": (120, 600), "conformance": (110, 420), "compile": (75, 240),
           "sanitizer": (45, 120), "bench": (100, 300), "local": (60, 300)}
TOTAL_BUDGET = 530
# every file a run writes into OUT_DIR: removed before a run starts
OUTPUTS = ("gpu_check.md", "gpu_check.json", "build.log", "conformance.xml", "conformance.log", "compile.json",
           "compile.log", "sanitizer.log", "sanitizer_memcheck.log", "sanitizer_racecheck.log", "sanitizer_synccheck.log",
           "bench.json", "bench.log", "local.json", "local.log")


def _written_since(path, since):
    """path exists and this run wrote it (not left from an earlier run)."""
    return path.exists() and path.stat().st_mtime >= since - 1


def run(cmd, budget, env=None, log=None):
    """Run cmd with a time limit; returns (status, seconds, output tail). Never raises."""
    t0 = time.time()
    full_env = dict(os.environ, **(env or {}))
    try:
        p = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=budget)
        out, status = p.stdout + p.stderr, ("passed" if p.returncode == 0 else f"failed (exit {p.returncode})")
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        status = f"timed out after {budget} s"
    except OSError as e:
        out, status = str(e), f"could not start ({e})"
    if log:
        Path(log).write_text(out)
    return status, time.time() - t0, "\n".join(out.splitlines()[-25:])


def device_env(dry):
    """Environment for subprocesses that run kernels: CPU stand-ins in the dry run."""
    if dry:
        return {"TRITON_INTERPRET": "1", "GSA_KERNELS_CUDA_EMULATE": "1", "GSA_BENCH_DEVICE": "cpu",
                "GSA_CONFORMANCE_DEVICE": "cpu", "OMP_NUM_THREADS": "2"}
    return {"GSA_BENCH_DEVICE": "cuda", "GSA_CONFORMANCE_DEVICE": "cuda"}


# ----------------------------------------------------------------------------- parts


def part_environment(args, out):
    info = {"python": sys.version.split()[0], "nproc": os.cpu_count(), "dry_run": args.dry_run}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                        memory_gib=round(p.total_memory / 2**30, 1))
    except Exception as e:  # noqa: BLE001 -- report, never stop
        info["torch_error"] = repr(e)
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        info["triton_error"] = repr(e)
    for tool in ("nvcc", "ninja", "compute-sanitizer", "nvidia-smi"):
        info[f"which_{tool}"] = shutil.which(tool) or _cuda_tool(tool)
    if info.get("which_nvidia-smi"):
        st, _, tail = run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,memory.total",
                           "--format=csv,noheader"], 20)
        info["nvidia_smi"] = tail.strip()
    ok = args.dry_run or info.get("cuda_available", False)
    return ("passed" if ok else "failed (no CUDA device visible to torch)"), info


def _cuda_tool(name):
    for root in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        p = Path(root) / "bin" / name
        if root and p.exists():
            return str(p)
    return None


def part_build(args, out):
    check = [sys.executable, "-c", "import gsa_kernels as gk, json; from gsa_kernels._core import _backends; "
             "print(json.dumps({n: list(s) for n, s in _backends.status().items()}))"]
    if args.dry_run:
        # The dry run checks the pipeline, not the compiler: the installed extension serves it (CI's
        # install built it, and .ci/run builds it again against the lowest torch). A whole CPU build
        # here cost CI 4-11 minutes. What is left to check: the extension imports, which backends run.
        st2, _, tail2 = run(check, 60, device_env(True))
        info = {"backends": tail2.strip().splitlines()[-1] if tail2.strip() else ""}
        if st2 != "passed":
            return f"failed: the installed extension does not import: {tail2}", info
        return "skipped: dry run (no build; the installed extension imports)", info
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    env = {"MAX_JOBS": str(os.cpu_count() or 2), "GSA_KERNELS_CUDA": "1", "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}"}
    if not shutil.which("nvcc") and _cuda_tool("nvcc"):
        env["PATH"] = f"{Path(_cuda_tool('nvcc')).parent}:{os.environ.get('PATH', '')}"
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    status, secs, tail = run(cmd, args.budget("build"), env, out / "build.log")
    info = {"command": " ".join(cmd), "env": env, "seconds": round(secs, 1)}
    if status == "passed":
        st2, _, tail2 = run(check, 60, device_env(False))
        info["backends"] = tail2.strip().splitlines()[-1] if tail2.strip() else ""
        if st2 != "passed":
            status = f"built, but importing failed: {tail2}"
    else:
        info["tail"] = tail
    return status, info


_TEST_ID = re.compile(r"^(?P<op>[\w]+)\[(?P<backend>[\w.]+)-(?P<family>[\w.]+)-(?P<case>.+)\]$")


def _counts_from_junit(path):
    """{backend: {family: [passed, total]}} from a junit xml (test names op[backend-family-case])."""
    counts, failures = {}, []
    root = ET.parse(path).getroot()
    for tc in root.iter("testcase"):
        m = _TEST_ID.match(tc.get("name", ""))
        backend, family = (m["backend"], f"{m['op']}:{m['family']}") if m else ("other", tc.get("name", "?"))
        if tc.find("skipped") is not None:
            continue
        bad = tc.find("failure") is not None or tc.find("error") is not None
        c = counts.setdefault(backend, {}).setdefault(family, [0, 0])
        c[1] += 1
        c[0] += 0 if bad else 1
        if bad:
            failures.append(tc.get("name"))
    return counts, failures


def part_conformance(args, out):
    xml = out / "conformance.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/conformance", f"--junitxml={xml}"]
    if args.dry_run:
        # a slice of the suite: enough to run every backend's stand-in end to end
        cmd += ["-k", os.environ.get("GSA_GPU_CHECK_DRY_K", "(cuda or triton) and (B1_D1_ or B15_D31_r1_)")]
    env = dict(device_env(args.dry_run))
    if args.dry_run:
        env.pop("TRITON_INTERPRET")  # the suite starts its own interpreter subprocess
    t0 = time.time()
    status, secs, tail = run(cmd, args.budget("conformance"), env, out / "conformance.log")
    info = {"command": " ".join(cmd), "seconds": round(secs, 1)}
    if _written_since(xml, t0):
        info["counts"], info["failures"] = _counts_from_junit(xml)
    else:
        info["tail"] = tail
    if not Path(REPO / "tests" / "conformance").exists():
        status = "failed (tests/conformance is missing)"
    return status, info


def part_compile(args, out):
    cmd = [sys.executable, str(Path(__file__)), "_compile_cases", "--out", str(out / "compile.json")]
    if args.dry_run:
        cmd.append("--dry-run")
    t0 = time.time()
    status, secs, tail = run(cmd, args.budget("compile"), device_env(args.dry_run), out / "compile.log")
    info = {"seconds": round(secs, 1)}
    if _written_since(out / "compile.json", t0):
        info["results"] = json.loads((out / "compile.json").read_text())
    else:
        info["tail"] = tail
    return status, info


def part_sanitizer(args, out):
    tool = shutil.which("compute-sanitizer") or _cuda_tool("compute-sanitizer")
    cases = [sys.executable, str(Path(__file__)), "_sanitizer_cases"] + (["--dry-run"] if args.dry_run else [])
    if args.dry_run or not tool:
        # nothing to sanitize without a GPU: run the case subset plainly so it cannot rot
        status, secs, tail = run(cases, args.budget("sanitizer"), device_env(args.dry_run), out / "sanitizer.log")
        why = "dry run (no GPU)" if args.dry_run else "compute-sanitizer is not on PATH"
        return ("skipped: " + why + f"; the case subset alone {status}"), {"seconds": round(secs, 1)}
    results, overall = {}, "passed"
    per_tool = args.budget("sanitizer") // 3
    for t in ("memcheck", "racecheck", "synccheck"):
        cmd = [tool, "--tool", t, "--error-exitcode", "1", "--target-processes", "all"] + cases
        status, secs, tail = run(cmd, per_tool, device_env(False), out / f"sanitizer_{t}.log")
        summary = [ln for ln in tail.splitlines() if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
        results[t] = {"status": status, "seconds": round(secs, 1), "summary": summary[-1:] or tail.splitlines()[-3:]}
        if status != "passed":
            overall = "failed"
    return overall, results


def part_bench(args, out):
    js = out / "bench.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/bench_gpu.py",
           "-k", "not test_gpu_local", f"--benchmark-json={js}", "--benchmark-disable-gc"]
    budget = args.budget("bench")
    pk = [sys.executable, "benchmarks/bench_gpu.py"]  # the device's peaks, measured now
    t0 = time.time()
    st2, secs2, tail2 = run(pk, min(30, budget // 4), device_env(args.dry_run))
    status, secs, tail = run(cmd, max(5, int(budget - secs2)), device_env(args.dry_run), out / "bench.log")
    info = {"command": " ".join(cmd), "seconds": round(secs, 1)}
    try:
        info["peaks"] = json.loads(tail2[tail2.index("{"):])
    except ValueError:
        info["peaks_error"] = tail2
    if _written_since(js, t0):
        info["rows"] = [b["extra_info"] for b in json.loads(js.read_text())["benchmarks"]]
    else:
        info["tail"] = tail
    return status, info


def part_local(args, out):
    js = out / "local.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/bench_gpu.py",
           "-k", "test_gpu_local", f"--benchmark-json={js}", "--benchmark-disable-gc"]
    t0 = time.time()
    status, secs, tail = run(cmd, args.budget("local"), device_env(args.dry_run), out / "local.log")
    info = {"command": " ".join(cmd), "seconds": round(secs, 1)}
    if _written_since(js, t0):
        info["rows"] = [b["extra_info"] for b in json.loads(js.read_text())["benchmarks"]]
    else:
        info["tail"] = tail
    return status, info


# ----------------------------------------------------------------------------- device-side cases


def _small_models(device, dtype):
    """A Gaussian, a low-rank mixture and an empirical mixture small enough for any tool."""
    import torch

    import gsa_kernels as gk

    gen = torch.Generator().manual_seed(0)
    D, r, K = 67, 5, 9
    basis = torch.linalg.qr(torch.randn(D, r, generator=gen, dtype=torch.float64))[0]
    g = gk.GaussianModel(torch.randn(D, generator=gen, dtype=torch.float64), basis,
                         torch.rand(r, generator=gen, dtype=torch.float64) * 3 + 0.1, 0.2).to(device, dtype)
    bases = torch.linalg.qr(torch.randn(K, D, r, generator=gen, dtype=torch.float64))[0]
    m = gk.GaussianMixture(torch.randn(K, D, generator=gen, dtype=torch.float64) * 2, bases,
                           torch.rand(K, r, generator=gen, dtype=torch.float64) + 0.1,
                           torch.rand(K, generator=gen, dtype=torch.float64) * 0.3 + 0.05,
                           torch.log_softmax(torch.randn(K, generator=gen, dtype=torch.float64), 0)).to(device, dtype)
    e = gk.GaussianMixture.from_points(torch.randn(300, D, generator=gen, dtype=torch.float64)).to(device, dtype)
    x = torch.randn(33, D, generator=gen, dtype=torch.float64).to(device, dtype) * 2
    sigma = torch.exp(torch.linspace(-6, 4.3, 33, dtype=torch.float64)).to(device, dtype)
    return g, m, e, x, sigma


def _calls(g, m, e, x, sigma):
    import math

    import gsa_kernels as gk

    s_traj = gk.schedules.karras(5).to(x.device, x.dtype)
    return {
        "gaussian_denoise": lambda b: gk.gaussian_denoise(x, sigma, g, backend=b),
        "gaussian_score": lambda b: gk.gaussian_score(x, sigma, g, backend=b),
        "gaussian_flow": lambda b: gk.gaussian_flow(x, sigma, 0.5 * sigma, g, scale_to=0.7, backend=b),
        "gaussian_flow_inf": lambda b: gk.gaussian_flow(x, math.inf, 3.0, g, backend=b),
        "gaussian_trajectory": lambda b: gk.gaussian_trajectory(x, s_traj[:-1] * 0 + s_traj[:-1], g, backend=b),
        "mixture_denoise": lambda b: gk.mixture_denoise(x, sigma, m, return_weights=True, backend=b),
        "mixture_logp": lambda b: gk.mixture_logp(x, sigma, m, backend=b),
        "empirical_denoise": lambda b: gk.mixture_denoise(x, sigma, e, backend=b),
    }


def _backends_here(dry):
    import gsa_kernels as gk

    wanted = ("triton", "cuda")
    return [b for b in wanted if b in gk.available_backends()]


COMPILED_OPS = ("gaussian_denoise", "gaussian_flow_inf", "gaussian_trajectory", "mixture_denoise", "mixture_logp")


def cmd_compile_cases(argv):
    """torch.compile(fullgraph=True) of each public op per backend (vs eager) and opcheck of the
    kernel-level ops; writes a JSON list of {backend, case, status}."""
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    device = "cpu" if a.dry_run else "cuda"
    compile_backend = "aot_eager" if a.dry_run else "inductor"
    g, m, e, x, sigma = _small_models(device, torch.float32)
    calls = _calls(g, m, e, x, sigma)
    results = []
    for backend in _backends_here(a.dry_run):
        for name, fn in calls.items():
            if name not in (("gaussian_denoise", "mixture_denoise") if a.dry_run else COMPILED_OPS):
                continue  # compile time: these show every op family
            try:
                torch._dynamo.reset()
                eager = fn(backend)
                comp = torch.compile(lambda fn=fn, backend=backend: fn(backend), fullgraph=True, backend=compile_backend)()
                flat = lambda o: torch.cat([t.reshape(-1).double() for t in (o if isinstance(o, tuple) else (o,))])
                err = (flat(comp) - flat(eager)).abs().max().item()
                ok = err <= 1e-5 * max(1.0, flat(eager).abs().max().item())
                results.append({"backend": backend, "case": f"compile:{name}", "status": "passed" if ok else f"failed: max error {err:.3g}"})
            except Exception as ex:  # noqa: BLE001 -- every case reports
                results.append({"backend": backend, "case": f"compile:{name}", "status": f"failed: {type(ex).__name__}: {str(ex)[:300]}"})
            Path(a.out).write_text(json.dumps(results, indent=1))  # partial results survive a time-out
        results += _opchecks(backend, g, m, x, sigma)
    Path(a.out).write_text(json.dumps(results, indent=1))
    bad = [r for r in results if r["status"] != "passed"]
    print(f"{len(results) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


def _opchecks(backend, g, m, x, sigma):
    """torch.library.opcheck on the kernel-level ops this backend runs, with real arguments."""
    import torch

    out = []
    for opname, args in (
        ("gaussian_map", (x, g.mean, g.basis, g.eigvals, float(g.residual_var), sigma, sigma, sigma, sigma, 0)),
        ("mixture_posterior", (x, m.means, m.bases, m.eigvals, m.residual_var, m.log_weights, sigma, True, True)),
    ):
        case = f"opcheck:{opname}"
        try:
            torch.library.opcheck(_kernel_op(backend, opname, x.device), args)
            out.append({"backend": backend, "case": case, "status": "passed"})
        except Exception as ex:  # noqa: BLE001 -- every case reports
            out.append({"backend": backend, "case": case, "status": f"failed: {type(ex).__name__}: {str(ex)[:300]}"})
    return out


def _kernel_op(backend, opname, device):
    """The torch.library op a backend dispatches to (cuda: the emulated twin on CPU tensors)."""
    import torch

    if backend == "cuda":
        prefix = "cuda_emu_" if device.type == "cpu" else ""
        return getattr(torch.ops.gsa_kernels, prefix + opname, None)
    from gsa_kernels.triton import _library  # registers gsa_kernels_triton::*

    return getattr(_library.ops, opname)


def cmd_sanitizer_cases(argv):
    """Every CUDA-backend kernel once on small inputs (compute-sanitizer runs this)."""
    import torch

    dry = "--dry-run" in argv
    device = "cpu" if dry else "cuda"
    g, m, e, x, sigma = _small_models(device, torch.float32)
    n = 0
    if "cuda" not in _backends_here(dry):
        print("cuda backend not available")
        return 1
    for fn in _calls(g, m, e, x, sigma).values():
        fn("cuda")
        n += 1
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{n} CUDA-backend cases ran")
    return 0


# ----------------------------------------------------------------------------- report


def _fmt_rate(v, unit):
    return "-" if v is None else f"{v:.1f} {unit}"


def bench_table(info):
    rows = info.get("rows") or []
    peaks = info.get("peaks") or {}
    if not rows:
        return ["(no benchmark rows)"]
    bw = peaks.get("copy_bytes_per_s")
    fp32 = peaks.get("matmul_fp32_flops")
    tc = peaks.get("matmul_bf16_flops")
    by_case = {}
    for r in rows:
        by_case.setdefault((r["workload"], r["sigma"], r["dtype"]), {})[r["impl"]] = r
    out = [f"peaks measured in this run: copy {_fmt_rate(bw and bw / 1e9, 'GB/s')}, "
           f"fp32 matmul (CUDA cores) {_fmt_rate(fp32 and fp32 / 1e12, 'TFLOP/s')}, "
           f"tf32 {_fmt_rate(peaks.get('matmul_tf32_flops') and peaks['matmul_tf32_flops'] / 1e12, 'TFLOP/s')}, "
           f"bf16 {_fmt_rate(tc and tc / 1e12, 'TFLOP/s')}",
           "",
           "roofline = max(bytes / copy bandwidth, FLOPs / fp32 matmul peak) (the kernels' float32 dots run on CUDA "
           "cores by default); TC roofline uses the bf16 matmul peak for the dot FLOPs.",
           "",
           "| case | dtype | impl | median ms | GB/s | TFLOP/s | x vs eager | x vs compiled | % roofline | % TC roofline |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (wl, s, dt), impls in by_case.items():
        for impl in ("triton", "cuda", "eager", "compiled"):
            r = impls.get(impl)
            if not r:
                continue
            t = r["median_ms"] * 1e-3
            flops = r["dot_flops"] + r["other_flops"]
            ours = impl not in ("eager", "compiled")
            ratio = lambda o, r=r, ours=ours, impls=impls: f"{impls[o]['median_ms'] / r['median_ms']:.2f}" if o in impls and ours else "-"
            roof = max(r["bytes"] / bw, flops / fp32) if bw and fp32 else None
            roof_tc = max(r["bytes"] / bw, r["dot_flops"] / tc + r["other_flops"] / fp32) if bw and fp32 and tc else None
            best = r["best_ms"] * 1e-3
            case = wl if s is None else f"{wl} sigma={s:g}"
            out.append(f"| {case} | {dt} | {impl} | {r['median_ms']:.3f} | {r['bytes'] / t / 1e9:.1f} | {flops / t / 1e12:.2f} | "
                       f"{ratio('eager')} | {ratio('compiled')} | {f'{100 * roof / best:.0f}%' if roof else '-'} | "
                       f"{f'{100 * roof_tc / best:.0f}%' if roof_tc else '-'} |")
    return out


def local_table(info):
    """The local machines: per mode, each implementation's median and best ms, our speed-up over
    the conv2d formulation (its median / ours) and our answer's max |difference| from its answer."""
    rows = info.get("rows") or []
    if not rows:
        return ["(no local rows)"]
    r0 = rows[0]
    out = [f"B={r0['B']} N={r0['N']} C={r0['C']} {r0['H']} x {r0['W']} P={r0['P']} sigma={r0['sigma']:g}, "
           f"{r0['dtype']}, zeros padding{' (REDUCED: dry-run sizes)' if r0.get('reduced') else ''}", "",
           "| machine | impl | median ms | best ms | x vs conv2d | max abs diff vs conv2d |", "|---|---|---:|---:|---:|---:|"]
    by_mode = {}
    for r in rows:
        by_mode.setdefault(r["workload"], {})[r["impl"]] = r
    for wl, impls in by_mode.items():
        conv = impls.get("conv2d")
        for impl in ("triton", "cuda", "conv2d"):
            r = impls.get(impl)
            if not r:
                continue
            ratio = f"{conv['median_ms'] / r['median_ms']:.1f}" if conv and impl != "conv2d" else "-"
            diff = f"{r['max_abs_diff_vs_conv2d']:.2g}" if "max_abs_diff_vs_conv2d" in r else "-"
            out.append(f"| {wl} | {impl} | {r['median_ms']:.3f} | {r['best_ms']:.3f} | {ratio} | {diff} |")
    return out


def write_report(out, args, parts):
    data = {"dry_run": args.dry_run, "parts": parts, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    (out / "gpu_check.json").write_text(json.dumps(data, indent=1, default=str))
    env = parts.get("environment", {}).get("info", {})
    md = [f"# gsa_kernels GPU check{' (DRY RUN: CPU stand-ins, reduced sizes)' if args.dry_run else ''}", "",
          f"{data['finished']}; {env.get('gpu', 'no GPU')} (capability {env.get('capability', '-')}, "
          f"{env.get('sm_count', '-')} SMs); torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
          f"Python {env.get('python', '?')}, {env.get('nproc', '?')} cores", "",
          "| part | status | seconds |", "|---|---|---:|"]
    for name, p in parts.items():
        md.append(f"| {name} | {p['status']} | {p['seconds']:.0f} |")
    conf = parts.get("conformance", {}).get("info", {})
    md += ["", "## Conformance (passed / total per backend and op:case family)", ""]
    for backend, fams in sorted((conf.get("counts") or {}).items()):
        md.append(f"- **{backend}**: " + ", ".join(f"{f} {p}/{t}" for f, (p, t) in sorted(fams.items())))
    if conf.get("failures"):
        md += ["", "Failed cases (first 40):", ""] + [f"- `{f}`" for f in conf["failures"][:40]]
    comp = parts.get("compile", {}).get("info", {}).get("results") or []
    md += ["", "## torch.compile and opcheck", ""] + [f"- {r['backend']} {r['case']}: {r['status']}" for r in comp]
    san = parts.get("sanitizer", {}).get("info") or {}
    md += ["", "## compute-sanitizer", ""] + [f"- {t}: {v}" for t, v in san.items()]
    md += ["", "## Benchmarks", ""] + bench_table(parts.get("bench", {}).get("info", {}))
    md += ["", "## Local score machines vs the conv2d formulation (same device)", ""] + local_table(
        parts.get("local", {}).get("info", {}))
    md += ["", "Logs of every part: *.log beside this report."]
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")


def main(argv):
    if argv and argv[0] == "_compile_cases":
        return cmd_compile_cases(argv[1:])
    if argv and argv[0] == "_sanitizer_cases":
        return cmd_sanitizer_cases(argv[1:])
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU stand-ins (Triton interpreter, CUDA emulation), reduced sizes")
    p.add_argument("--parts", default=",".join(BUDGETS), help="comma-separated subset of " + ",".join(BUDGETS))
    p.add_argument("out_dir")
    args = p.parse_args(argv)
    start = time.time()
    if args.dry_run:
        args.budget = lambda name: BUDGETS[name][1]
    else:
        args.budget = lambda name: max(5, int(min(BUDGETS[name][0], TOTAL_BUDGET - (time.time() - start))))
    out = (Path(os.environ.get("GSA_GPU_CHECK_CALLER_DIR") or os.getcwd()) / args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # an earlier run's results must not read as this run's
        (out / name).unlink(missing_ok=True)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("[gpu_check] FAILED: no CUDA device is visible to torch (torch.cuda.is_available() is False); "
                  "on a machine without a GPU use --dry-run", file=sys.stderr, flush=True)
            parts = {"environment": {"status": "failed (no CUDA device visible to torch)", "seconds": time.time() - start,
                                     "info": part_environment(args, out)[1]}}
            write_report(out, args, parts)
            return 2
    parts = {}
    for name in [n for n in args.parts.split(",") if n]:
        t0 = time.time()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            status, info = globals()[f"part_{name}"](args, out)
        except Exception as e:  # noqa: BLE001 -- a failing part never stops the next
            status, info = f"failed ({type(e).__name__}: {e})", {}
        parts[name] = {"status": status, "seconds": time.time() - t0, "info": info}
        print(f"[gpu_check] {name}: {status} ({time.time() - t0:.0f} s)", flush=True)
        write_report(out, args, parts)  # a report even if the machine is taken away mid-run
    failed = [n for n, p in parts.items() if not (p["status"] == "passed" or p["status"].startswith("skipped"))]
    print(f"[gpu_check] report: {out / 'gpu_check.md'}; failed parts: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
