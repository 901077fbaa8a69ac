"""Peak dense throughput and memory bandwidth of known GPUs, looked up by the device name.

MFU divides by these numbers, so a wrong entry is a wrong headline: every figure below is the
*dense* (no 2:4 sparsity) tensor-core peak at boost clock, taken from NVIDIA's datasheets or
architecture whitepapers (cited per entry; datasheets print the sparse figure, which is 2x).
``fp32`` is the plain FP32 (CUDA-core, non-tensor) peak: it is the right denominator for fp32
training only when TF32 matmuls are off (torch's default); with TF32 on, use ``tf32``.

An unknown GPU, or a MIG slice (a fraction of the SMs), has no peak: ``peak_tflops`` returns None
and the caller must print "unknown peak" -- never a fallback to some other GPU's number.

Matching is by whole tokens of the lower-cased name (``-``/``_`` count as spaces), so "a10" never
matches "a100" or "a10g", and "l4" never matches "l40s". Entries are tried in order, most
specific first ("h100 nvl" before "h100 pcie" before plain "h100", which is the SXM part: torch
and NVML call it "NVIDIA H100 80GB HBM3").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "tf32": "tf32",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
}


@dataclass(frozen=True)
class GpuSpec:
    slug: str  # stable lower-case id used in result paths, e.g. "h100", "a100-80gb"
    tokens: frozenset  # every token must appear in the device name
    bf16_tflops: Optional[float]
    fp16_tflops: Optional[float]  # with fp32 accumulation (what training uses)
    tf32_tflops: Optional[float]
    fp32_tflops: Optional[float]  # non-tensor FP32
    mem_bandwidth_gbps: Optional[float]  # GB/s (1e9 bytes), None where the variant is ambiguous
    source: str


def _spec(slug, tokens, bf16, fp16, tf32, fp32, bw, source) -> GpuSpec:
    return GpuSpec(slug, frozenset(tokens.split()), bf16, fp16, tf32, fp32, bw, source)


_H100_DS = "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): sparse figures / 2"
_H200_DS = "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): sparse figures / 2"
_A100_DS = "NVIDIA A100 datasheet nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"

# Order matters: the first entry whose tokens are all in the name wins.
_SPECS = (
    # Hopper. 989.4 = 132 SMs x 4096 dense bf16 FLOP/clk x 1.83 GHz (datasheet: 1,979 sparse).
    _spec("h100-nvl", "h100 nvl", 835.5, 835.5, 417.5, 60.0, 3900.0, _H100_DS + " (H100 NVL column)"),
    _spec("h100-pcie", "h100 pcie", 756.5, 756.5, 378.0, 51.2, 2000.0, _H100_DS + " (H100 PCIe column)"),
    _spec("h100", "h100", 989.4, 989.4, 494.7, 66.9, 3350.0, _H100_DS + " (H100 SXM column)"),
    _spec("h200-nvl", "h200 nvl", 835.5, 835.5, 417.5, 60.0, 4800.0, _H200_DS + " (H200 NVL column)"),
    _spec("h200", "h200", 989.4, 989.4, 494.7, 66.9, 4800.0, _H200_DS + " (H200 SXM column)"),
    # Blackwell: HGX B200 per-GPU figures (4.5 PF bf16 sparse, 2.2 PF tf32 sparse, 7.7 TB/s).
    _spec(
        "b200",
        "b200",
        2250.0,
        2250.0,
        1100.0,
        75.0,
        7700.0,
        "NVIDIA Blackwell datasheet (nvdam.widen.net/s/wwnsxrhm2w), HGX B200 column: sparse / 2",
    ),
    # Ampere data center. Same compute for every A100; bandwidth differs by memory and board.
    _spec("a100-80gb-pcie", "a100 80gb pcie", 312.0, 312.0, 156.0, 19.5, 1935.0, _A100_DS),
    _spec("a100-80gb", "a100 80gb", 312.0, 312.0, 156.0, 19.5, 2039.0, _A100_DS),
    _spec("a100-40gb-pcie", "a100 pcie 40gb", 312.0, 312.0, 156.0, 19.5, 1555.0, _A100_DS),
    _spec("a100-40gb", "a100 40gb", 312.0, 312.0, 156.0, 19.5, 1555.0, _A100_DS),
    _spec("a100", "a100", 312.0, 312.0, 156.0, 19.5, None, _A100_DS + " (memory size not in name)"),
    _spec("a10", "a10", 125.0, 125.0, 62.5, 31.2, 600.0, "NVIDIA A10 datasheet: sparse figures / 2"),
    # Ada data center.
    _spec("l40s", "l40s", 362.05, 362.05, 183.0, 91.6, 864.0, "NVIDIA L40S datasheet: sparse figures / 2"),
    _spec("l40", "l40", 181.05, 181.05, 90.5, 90.5, 864.0, "NVIDIA L40 datasheet: sparse figures / 2"),
    _spec("l4", "l4", 121.0, 121.0, 60.0, 30.3, 300.0, "NVIDIA L4 datasheet: sparse figures / 2"),
    # GeForce: tensor throughput with fp32 accumulation is half the fp16-accumulate figure.
    _spec(
        "rtx-4090",
        "rtx 4090",
        165.2,
        165.2,
        82.6,
        82.6,
        1008.0,
        "NVIDIA Ada Lovelace architecture whitepaper, Appendix (RTX 4090, FP32 accumulate, dense)",
    ),
    _spec(
        "rtx-3090",
        "rtx 3090",
        71.0,
        71.0,
        35.6,
        35.6,
        936.0,
        "NVIDIA Ampere GA102 whitepaper, Appendix A (RTX 3090, FP32 accumulate, dense)",
    ),
)
# Not listed on purpose: A10G (AWS-only part, no NVIDIA datasheet to cite), H800/A800 (export
# variants with differing boards). They come out as "unknown peak" until someone adds a source.


def name_tokens(gpu_name: str) -> list[str]:
    """Lower-case word tokens of a device name: "NVIDIA A100-SXM4-80GB" -> [nvidia, a100, sxm4, 80gb]."""
    return [t for t in re.split(r"[^a-z0-9.]+", gpu_name.lower()) if t]


def lookup(gpu_name: Optional[str]) -> Optional[GpuSpec]:
    """The table entry for a device name, or None (unknown GPU, MIG slice, or no GPU)."""
    if not gpu_name:
        return None
    tokens = set(name_tokens(gpu_name))
    if "mig" in tokens:  # a MIG instance owns a fraction of the SMs and of the bandwidth
        return None
    for spec in _SPECS:
        if spec.tokens <= tokens:
            return spec
    return None


def normalize_dtype(dtype) -> str:
    """'bf16' | 'fp16' | 'tf32' | 'fp32' from a short name, a long name or a torch.dtype."""
    name = str(dtype).lower().removeprefix("torch.")
    if name not in DTYPE_ALIASES:
        raise ValueError(f"dtype {dtype!r} has no peak in the table; choose one of: {', '.join(sorted(DTYPE_ALIASES))}")
    return DTYPE_ALIASES[name]


def peak_tflops(gpu_name: Optional[str], dtype) -> Optional[float]:
    """Dense peak TFLOP/s of ``gpu_name`` in ``dtype``; None means "unknown peak" (say so)."""
    key = normalize_dtype(dtype)
    spec = lookup(gpu_name)
    return None if spec is None else getattr(spec, f"{key}_tflops")


def peak_memory_bandwidth_gbps(gpu_name: Optional[str]) -> Optional[float]:
    """Peak DRAM bandwidth in GB/s (1e9 bytes/s); None when unknown."""
    spec = lookup(gpu_name)
    return None if spec is None else spec.mem_bandwidth_gbps
