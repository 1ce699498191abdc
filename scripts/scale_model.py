"""The memory and time model of docs/scale.md ("Telemetry at scale"), printed as its tables.

    python scripts/scale_model.py                       # the tables of docs/scale.md
    python scripts/scale_model.py --free-gb 60 --tokens 4e6 --eig-cpu-s 13.1 --lanczos-cpu-s 10

Every figure is arithmetic on the shapes and on a few rates, which are arguments: the
CPU rates are calibrated by benchmarks/bench_scale.py (eigvalsh and Lanczos seconds at
D = 4,096 on one core of this project's CPU), the GPU rates are a stated model (no GPU
measurement backs them). The probe holds 3 bucket states per site (HEAD/MID/TAIL; "all"
is merged from them when a window is decomposed, one more state at a time).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9
AUTO_DEVICE_FRACTION = 0.25  # capscale.probe.hoststates: "auto" keeps states on the device up to this of free
LANCZOS_MATVECS = 3 * 32 + 48 * (32 + 32)  # (power + 1)·deflate + steps·(deflate + probes), the defaults


@dataclass(frozen=True)
class Shape:
    name: str
    width: int  # FFN width D
    layers: int


SHAPES = (
    Shape("paper-160m", 3072, 12),
    Shape("paper-350m", 4096, 24),
    Shape("llama3-8b", 14336, 32),
    Shape("llama3-70b", 28672, 80),
)


def state_bytes(width: int, itemsize: int = 8) -> int:
    """One D×D state."""
    return width * width * itemsize


def states_per_layer(sites: int, buckets: bool) -> int:
    return sites * (3 if buckets else 1)


def replicated_bytes(s: Shape, sites: int, buckets: bool) -> int:
    """Every state of the model on each rank (today's layout, on the device)."""
    return s.layers * states_per_layer(sites, buckets) * state_bytes(s.width)


def sharded_bytes(s: Shape, sites: int, buckets: bool, tp: int) -> int:
    """Block-row states under tensor parallelism: each rank its D/tp rows (docs/parallel.md)."""
    return replicated_bytes(s, sites, buckets) // tp


def host_layout_device_bytes(s: Shape, tp: int = 1, gemm_itemsize: int = 4) -> int:
    """The host layout's device buffer: one (D/tp)×D GEMM buffer in the GEMM dtype (float32)."""
    return (s.width // tp) * s.width * gemm_itemsize


def gemm_flops(s: Shape, tokens: float, sites: int, tp: int = 1) -> float:
    """Scatter GEMM flops of one window over ``tokens`` tokens (all ranks' rows), per rank of a tp group
    that sees them all: 2·N·D² per site and layer, 1/tp of it for block rows. (The probe's block upper
    triangle does 10/16 of it for large batches; this is the plain count.)"""
    return 2.0 * tokens * s.width**2 * sites * s.layers / tp


def eig_seconds(width: int, ref_seconds: float, ref_width: int = 4096) -> float:
    """eigvalsh time, cubic in D from a measured reference."""
    return ref_seconds * (width / ref_width) ** 3


def lanczos_seconds(width: int, ref_seconds: float, ref_width: int = 4096) -> float:
    """Lanczos time, quadratic in D (its matmats) from a measured reference."""
    return ref_seconds * (width / ref_width) ** 2


def gpu_lanczos_seconds(width: int, flops_per_s: float) -> float:
    """The Lanczos matmats' flops on a GPU at ``flops_per_s`` (float64)."""
    return 2.0 * width * width * LANCZOS_MATVECS / flops_per_s


def auto_layout(need: int, free: float) -> str:
    return "device" if need <= AUTO_DEVICE_FRACTION * free else "host"


def table(args) -> list[str]:
    lines = [
        "| shape | D | layers | per state | pooled post, replicated | pre+post × 3 buckets, replicated | "
        f"same, tp={args.tp} sharded | host layout, device | host layout tp={args.tp}, device | auto on "
        f"{args.free_gb:g} GB free |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in SHAPES:
        full = replicated_bytes(s, 2, True)
        need = full * (2 if args.background_device else 1)
        lines.append(
            f"| {s.name} | {s.width:,} | {s.layers} | {state_bytes(s.width) / GB:.3g} GB | "
            f"{replicated_bytes(s, 1, False) / GB:,.3g} GB | {full / GB:,.4g} GB | "
            f"{sharded_bytes(s, 2, True, args.tp) / GB:,.4g} GB | {host_layout_device_bytes(s) / 1e6:,.1f} MB | "
            f"{host_layout_device_bytes(s, args.tp) / 1e6:,.1f} MB | {auto_layout(need, args.free_gb * GB)} |"
        )
    lines += [
        "",
        f"| shape | GEMM per window ({args.tokens:.3g} tokens), tp=1 | tp={args.tp} per rank | "
        "eigvalsh per state, 1 CPU core | Lanczos per state, 1 CPU core | eigvalsh per state, GPU (model) | "
        "Lanczos per state, GPU (model) | states per window (pre+post × 4) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in SHAPES:
        n = s.layers * 2 * 4
        lines.append(
            f"| {s.name} | {gemm_flops(s, args.tokens, 2) / 1e15:,.3g} PFLOP | "
            f"{gemm_flops(s, args.tokens, 2, args.tp) / 1e15:,.3g} PFLOP | "
            f"{eig_seconds(s.width, args.eig_cpu_s):,.0f} s | {lanczos_seconds(s.width, args.lanczos_cpu_s):,.0f} s | "
            f"{eig_seconds(s.width, args.eig_gpu_s, 8192):,.1f} s | "
            f"{gpu_lanczos_seconds(s.width, args.gpu_fp64_tflops * 1e12):.3f} s | {n} |"
        )
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--free-gb", type=float, default=60.0, help="free device memory at attach (an 80 GB GPU)")
    ap.add_argument("--background-device", action="store_true", help="count a device snapshot (background=True)")
    ap.add_argument("--tokens", type=float, default=1 << 20, help="tokens in one measurement window")
    ap.add_argument("--eig-cpu-s", type=float, default=13.1, help="eigvalsh at D=4096, one core (measured)")
    ap.add_argument("--lanczos-cpu-s", type=float, default=10.0, help="Lanczos at D=4096, one core (measured)")
    ap.add_argument("--eig-gpu-s", type=float, default=1.5, help="float64 eigvalsh at D=8192 on a GPU (model)")
    ap.add_argument("--gpu-fp64-tflops", type=float, default=50.0, help="float64 GEMM rate of a GPU (model)")
    args = ap.parse_args(argv)
    print("\n".join(table(args)))


if __name__ == "__main__":
    main()
