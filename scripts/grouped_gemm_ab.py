"""opt.fused_lora_grouped_gemm on vs off in ONE process, steps interleaved: the grouping's own cost, host held fixed.

Single-process bench points differ by more than the grouping can (logs/h100/points-1671cd8: two grouped LoRA
processes measured forward 143.8 and 130.4 ms, two grouped QLoRA ones backward 256.9 and 276.4 ms). Here both
models are built as a bench point builds them (optkit.bench.setup.build_training: the point's model cut to
``--layers`` decoder layers, opt=full, standard checkpointing, foreach AdamW) in one process, and their steps
alternate, so clocks, host load and allocator state are shared. Per phase it prints the median over the steps of

- device ms: CUDA events between the phases, as the bench's PhaseTimer splits a step (GPU idle included);
- host ms: wall time the host spent issuing the phase (no synchronize inside a step). Where host ms is close to
  device ms, the phase is host-bound and its device time is the host's, not the kernels'.

Then the NF4 dequantize alone at Llama-3-8B widths (bitsandbytes double-quantized weights): one group launch
vs one launch per weight, device time by CUDA events (median of ``--repeats``) and host time per call.

  python scripts/grouped_gemm_ab.py [--layers 4] [--steps 20] [--methods lora,qlora] [--json F]
  TRITON_INTERPRET=1 python scripts/grouped_gemm_ab.py --cpu-smoke     # tiny model on CPU: plumbing only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optkit.bench.setup import build_training  # noqa: E402
from optkit.config.compose import compose  # noqa: E402

PHASES = ("forward", "backward", "optimizer")


class _Clock:
    """Marks on the stream (CUDA events) and on the host clock at the same points."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks = cuda, []

    def mark(self) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((event, time.perf_counter()))

    def phases(self) -> dict:
        out = {}
        for phase, (a, b) in zip(PHASES, zip(self.marks, self.marks[1:])):
            out[f"{phase}_host_ms"] = (b[1] - a[1]) * 1e3
            out[f"{phase}_device_ms"] = a[0].elapsed_time(b[0]) if self.cuda else out[f"{phase}_host_ms"]
        return out


def _step(model, optimizer, batch, clock: _Clock) -> None:
    clock.mark()
    loss = model(**batch.tensors, use_cache=False).loss
    clock.mark()
    loss.backward()
    clock.mark()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clock.mark()


def ab_steps(overrides, device, steps: int, warmup: int) -> dict:
    """{grouped: {field: median}} over ``steps`` interleaved steps after ``warmup`` each."""
    runs = {
        g: build_training(compose([*overrides, f"opt.fused_lora_grouped_gemm={str(g).lower()}"]), device)
        for g in (False, True)
    }
    rows = {g: [] for g in runs}
    for i in range(warmup + steps):
        for grouped, (model, optimizer, batches, _) in runs.items():
            clock = _Clock(device.type == "cuda")
            _step(model, optimizer, batches[i % len(batches)], clock)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                rows[grouped].append(clock.phases())
    return {g: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for g, rs in rows.items()}


def nf4_dequantize(repeats: int) -> dict:
    """Device and host ms of Llama-3-8B's Q/K/V and gate/up dequantize: one group launch vs one per weight."""
    from bitsandbytes.functional import quantize_4bit

    from optkit.kernels.nf4_dequantize import NF4Dequantizer, NF4GroupDequantizer

    out = {}
    for name, rows in (("qkv", (4096, 1024, 1024)), ("gate_up", (14336, 14336))):
        dense = [torch.randn(r, 4096, device="cuda", dtype=torch.bfloat16) * 0.02 for r in rows]
        weights = [quantize_4bit(w, quant_type="nf4", compress_statistics=True) for w in dense]  # QLoRA's storage
        group, singles = NF4GroupDequantizer(weights), [NF4Dequantizer(*w) for w in weights]
        for label, call in (
            ("group", lambda: group(torch.bfloat16)),
            ("singles", lambda: [s(torch.bfloat16) for s in singles]),
        ):
            call()
            device_ms, host_ms = [], []
            for _ in range(repeats):
                torch.cuda._sleep(2_000_000)  # keep the GPU busy so the host time is the launch's alone
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                start.record()
                call()
                end.record()
                host_ms.append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
                device_ms.append(start.elapsed_time(end))
            out[f"{name}_{label}"] = {"device_ms": statistics.median(device_ms), "host_ms": statistics.median(host_ms)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--json", default=None, help="also write the results there")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny_llama on CPU, 2 steps: plumbing only")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    model = ["model=tiny_llama", "data.seq_len=16"] if smoke else ["model=llama3_8b", "data.seq_len=2048"]
    base = [*model, f"model.num_layers={args.layers}", "opt=full", "train.checkpointing=standard", "train.batch_size=2"]
    results = {}
    for method in args.methods.split(","):
        medians = ab_steps([*base, f"train={method}"], device, 2 if smoke else args.steps, 1 if smoke else args.warmup)
        for grouped, fields in medians.items():
            label = f"{method} {'grouped' if grouped else 'ungrouped'}"
            results[label] = fields
            device_ms = "/".join(f"{fields[f'{p}_device_ms']:.2f}" for p in PHASES)
            host_ms = "/".join(f"{fields[f'{p}_host_ms']:.2f}" for p in PHASES)
            print(f"{label:16s} device fwd/bwd/opt ms {device_ms}   host fwd/bwd/opt ms {host_ms}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not smoke:
        for label, fields in nf4_dequantize(args.repeats).items():
            results[f"nf4 {label}"] = fields
            print(f"nf4 {label:14s} device {fields['device_ms']:.3f} ms   host {fields['host_ms']:.3f} ms per call")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
