"""Micro-benchmark of NeighborConv2d: fast form (one 3x3 conv) vs the seed's formulation.

Times forward + backward (gradients w.r.t. input, weight and bias) in float32, batch 16, for
1->64 @256x256, 3->32 @256x256 and 64->64 @128x128; the implementations are run interleaved
(order rotated every repeat) after warm-up, and the median of the repeats is reported.

FLOPs counted (useful work only): forward = 2 * N * H * W * Cin * Cout * 8 (one multiply and
one add per tap, 8 taps, centre excluded; bias, padding and copies not counted);
forward + backward = 3 x forward (grad-input and grad-weight each cost one forward).
The machine's matmul rate is the median of a 2048x2048 float32 ``torch.matmul`` (2 * 2048^3).

    PYTHONPATH=src python benchmarks/bench_neighbor_conv.py [--quick] [--device auto|cpu|cuda]
        [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flawscope.nn import NeighborConv2d  # noqa: E402

# (in_channels, out_channels, height=width)
FULL_SHAPES = [(1, 64, 256), (3, 32, 256), (64, 64, 128)]
FULL_BATCH = 16
QUICK_SHAPES = [(1, 64, 128), (3, 32, 128), (64, 64, 64)]
QUICK_BATCH = 4
IMPLS = ("seed", "fast")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available")
    return torch.device(name)


def matmul_gflops(device: torch.device, n: int, repeats: int) -> float:
    """Median float32 ``n x n`` matmul rate in GFLOP/s (2 n^3 FLOPs per product)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        torch.matmul(a, b)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def _step_fn(
    layer: NeighborConv2d, x: torch.Tensor, grad_out: torch.Tensor, device: torch.device
) -> Callable[[], float]:
    def step() -> float:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        y = layer(x)
        y.backward(grad_out)
        _sync(device)
        return time.perf_counter() - t0

    return step


def bench_shape(
    cin: int, cout: int, hw: int, batch: int, device: torch.device, warmup: int, repeats: int
) -> dict:
    torch.manual_seed(0)
    layers = {impl: NeighborConv2d(cin, cout, impl=impl).to(device) for impl in IMPLS}
    layers["fast"].load_state_dict(layers["seed"].state_dict())
    x = torch.randn(batch, cin, hw, hw, device=device, requires_grad=True)
    grad_out = torch.randn(batch, cout, hw, hw, device=device)
    steps = {impl: _step_fn(layer, x, grad_out, device) for impl, layer in layers.items()}
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for r in range(repeats):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]  # alternate to share load drift fairly
        for impl in order:
            times[impl].append(steps[impl]())
    flops = 3 * 2 * batch * hw * hw * cin * cout * 8
    auto_choice = NeighborConv2d(cin, cout).impl  # the default
    med = {impl: statistics.median(t) for impl, t in times.items()}
    return {
        "shape": f"{cin}->{cout} @{hw}x{hw}",
        "batch": batch,
        "in_channels": cin,
        "out_channels": cout,
        "size": hw,
        "flops_fwd_bwd": flops,
        "seed_ms": med["seed"] * 1e3,
        "fast_ms": med["fast"] * 1e3,
        "seed_ms_all": [t * 1e3 for t in times["seed"]],
        "fast_ms_all": [t * 1e3 for t in times["fast"]],
        "speedup": med["seed"] / med["fast"],
        "auto": auto_choice,
        "auto_ms": med[auto_choice] * 1e3,
        "gflops_seed": flops / med["seed"] / 1e9,
        "gflops_fast": flops / med["fast"] / 1e9,
    }


def format_table(rows: list[dict], matmul: float) -> str:
    header = [
        "shape", "seed ms", "fast ms", "speedup", "auto", "GFLOP/s seed", "GFLOP/s fast",
        "matmul GFLOP/s",
    ]  # fmt: skip
    body = [
        [
            r["shape"],
            f"{r['seed_ms']:.1f}",
            f"{r['fast_ms']:.1f}",
            f"{r['speedup']:.2f}x",
            r["auto"],
            f"{r['gflops_seed']:.1f}",
            f"{r['gflops_fast']:.1f}",
            f"{matmul:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = []
    for k, line in enumerate([header, *body]):
        cells = [
            c.ljust(w) if i in (0, 4) else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, batch 4")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write results to this file")
    args = parser.parse_args(argv)

    device = _resolve_device(args.device)
    warmup = max(args.warmup, 3) if device.type == "cuda" else args.warmup
    shapes, batch = (QUICK_SHAPES, QUICK_BATCH) if args.quick else (FULL_SHAPES, FULL_BATCH)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"cpu {platform.processor() or platform.machine()}, batch {batch}, float32, "
        f"fwd+bwd, median of {args.repeats} (warm-up {warmup})",
        flush=True,
    )
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    matmul = matmul_gflops(device, 1024 if args.quick else 2048, 5 if args.quick else 7)
    rows = []
    for cin, cout, hw in shapes:
        rows.append(bench_shape(cin, cout, hw, batch, device, warmup, args.repeats))
        print(f"  done {rows[-1]['shape']}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(format_table(rows, matmul))
    print(
        "FLOPs = 3 x forward, forward = 2*N*H*W*Cin*Cout*8 (centre tap, bias, copies excluded); "
        f"1-min load average {load_before:.1f} -> {load_after:.1f}; "
        f"total {time.perf_counter() - t_start:.0f} s"
    )
    worst = max(rows, key=lambda r: r["auto_ms"] / r["seed_ms"])
    print(
        f"auto/seed time ratio, worst shape: {worst['auto_ms'] / worst['seed_ms']:.2f} "
        f"({worst['shape']}, auto={worst['auto']})"
    )
    if args.json is not None:
        result = {
            "torch": torch.__version__,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "batch": batch,
            "quick": args.quick,
            "warmup": warmup,
            "repeats": args.repeats,
            "matmul_gflops": matmul,
            "loadavg_1min": [load_before, load_after],
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
