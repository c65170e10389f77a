"""Benchmark: the project's differentiable sorter vs. ``diffsort``, forward + backward.

    python benchmarks/sorter.py                     # CPU: 3,136 and 31,360 rows, n = 49
    python benchmarks/sorter.py --device cuda       # CUDA: 31,360 and 62,720 rows

Both sorters run side by side in one process on the same inputs (float32, bitonic, cauchy,
steepness 100 as in NeCo) with the same upstream gradient (a random weighting of both
outputs). Time = median of warm repeats of forward + backward. Peak memory:

* CUDA: ``torch.cuda.max_memory_allocated`` above the memory held before the call.
* CPU: one forward + backward in a fresh child process started with glibc's
  ``MALLOC_MMAP_THRESHOLD_=131072``, so every tensor buffer is its own mapping that goes back
  to the OS when freed; the peak of the child's RSS above its RSS just before the call
  (sampled every 2 ms by a background thread) is the figure. ``tracemalloc`` does not see
  tensor storage, and in a process that already ran the timed repeats freed buffers stay in
  the heap and hide the peak, hence the child.

Prints a table with the speed-up and memory ratios and writes the result file
(``benchmarks/common.py`` schema) to ``benchmarks/results/sorter_<device>.json`` or ``--out``:
``settings`` holds the sorter parameters and repeats, ``results`` one row per row count
(``ours`` / ``diffsort``: median and all times, peak bytes; ``speedup``, ``memory_ratio``),
``goal`` is null (the ratios are reported, not judged).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import default_path, machine_info, make_result, write_result

from neco.training.sorting import soft_sort

N = 49
STEEPNESS = 100.0


def time_sorter_step(
    x: torch.Tensor, network: str = "bitonic", steepness: float = STEEPNESS, distribution: str = "cauchy"
) -> float:
    """Seconds for one forward + backward of :func:`soft_sort` on ``x`` (for other benchmarks).

    Uses a fixed random weighting of both outputs as the upstream gradient and synchronises
    the device, so the figure is comparable with the training benchmark's step split.
    """
    return _timed(
        _make_step(lambda v: soft_sort(v, network=network, steepness=steepness, distribution=distribution), x)
    )


def _make_step(sort_fn: Callable, x: torch.Tensor) -> Callable[[], None]:
    gen = torch.Generator(device="cpu").manual_seed(1)
    w_vals = torch.randn(x.shape, generator=gen).to(x.device)
    w_perm = torch.randn(*x.shape, x.shape[-1], generator=gen).to(x.device)

    def step() -> None:
        leaf = x.detach().requires_grad_(True)
        values, perm = sort_fn(leaf)
        torch.autograd.backward((values, perm), (w_vals, w_perm))

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], None], device: torch.device | None = None) -> float:
    device = device or torch.device("cpu")
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak extra bytes while ``step`` runs (see the module docstring for the method)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        step()
    finally:
        done.set()
        sampler.join()
    return max(peak, _rss_bytes()) - base


def _cpu_peak_in_child(impl: str, rows: int, threads: int | None) -> int:
    """Peak extra RSS of one step of ``impl`` measured in a fresh process (module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--memory-child", impl, "--rows", str(rows)]
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def _steps(rows: int, device: torch.device, reference: bool) -> dict[str, Callable[[], None]]:
    """The benchmarked steps on the same seeded input: ours and (optionally) diffsort."""
    x = torch.randn(rows, N, generator=torch.Generator().manual_seed(rows)).to(device)
    steps = {"ours": _make_step(lambda v: soft_sort(v, steepness=STEEPNESS), x)}
    if reference:
        from diffsort import DiffSortNet  # benchmark/test-only dependency

        ref_net = DiffSortNet("bitonic", N, device=str(device), steepness=STEEPNESS)
        steps["diffsort"] = _make_step(ref_net, x)
    return steps


def _measure(step: Callable[[], None], device: torch.device, repeats: int) -> dict:
    step()  # warm-up: allocator, thread pools, lazily built index tables
    times = [_timed(step, device) for _ in range(repeats)]
    return {"median_s": statistics.median(times), "times_s": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--rows", type=int, nargs="+", default=None, help="row counts (default: 3136 31360 on CPU, 31360 62720 on CUDA)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of our sorter")
    parser.add_argument("--ref-repeats", type=int, default=3, help="timed repeats of diffsort")
    parser.add_argument("--no-reference", action="store_true", help="skip diffsort")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads for both sorters (default: torch's)"
    )
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/sorter_<device>.json")
    parser.add_argument("--memory-child", choices=("ours", "diffsort"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:  # internal: one CPU memory measurement (see _cpu_peak_in_child)
        step = _steps(args.rows[0], torch.device("cpu"), args.memory_child == "diffsort")
        print(_peak_memory(step[args.memory_child], torch.device("cpu")))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    rows_list = args.rows or ([3136, 31360] if device.type == "cpu" else [31360, 62720])
    machine = {**machine_info(), "torch_threads": torch.get_num_threads()}  # load average before the timed work
    settings = {
        "device": device.type,
        "rows": rows_list,
        "n": N,
        "dtype": "float32",
        "network": "bitonic",
        "distribution": "cauchy",
        "steepness": STEEPNESS,
        "repeats": args.repeats,
        "ref_repeats": None if args.no_reference else args.ref_repeats,
        "memory_method": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "child-process RSS peak above baseline (MALLOC_MMAP_THRESHOLD_=131072), 2 ms sampling",
    }

    results = []
    for rows in rows_list:
        entry: dict = {"rows": rows}
        steps = _steps(rows, device, not args.no_reference)
        for name, step in steps.items():
            entry[name] = _measure(step, device, args.ref_repeats if name == "diffsort" else args.repeats)
            entry[name]["peak_bytes"] = (
                _peak_memory(step, device) if device.type == "cuda" else _cpu_peak_in_child(name, rows, args.threads)
            )
        del steps
        if "diffsort" in entry:
            entry["speedup"] = entry["diffsort"]["median_s"] / entry["ours"]["median_s"]
            entry["memory_ratio"] = entry["ours"]["peak_bytes"] / max(entry["diffsort"]["peak_bytes"], 1)
        results.append(entry)
        _print_row(entry)

    document = make_result("sorter", settings, results, goal=None, machine=machine)
    write_result(document, args.out or default_path("sorter", device.type))
    return 0


def _print_row(e: dict) -> None:
    mib = 2**20
    head = f"{'rows':>7} {'impl':>9} {'median s':>10} {'peak MiB':>10}"
    print(head)
    print(f"{e['rows']:>7} {'ours':>9} {e['ours']['median_s']:>10.3f} {e['ours']['peak_bytes'] / mib:>10.1f}")
    if "diffsort" in e:
        print(
            f"{e['rows']:>7} {'diffsort':>9} {e['diffsort']['median_s']:>10.3f} "
            f"{e['diffsort']['peak_bytes'] / mib:>10.1f}"
        )
        print(f"{'':>7} speed-up x{e['speedup']:.1f}, memory ours/diffsort = {e['memory_ratio']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
