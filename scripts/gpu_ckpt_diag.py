"""Diagnose a gradient gap of the offload checkpointing modes on a GPU (issue 5).

    python scripts/gpu_ckpt_diag.py [--layers 4] [--method lora]

For Llama-3-8B shapes cut to --layers (bf16, 2 x 2048), prints for each mode and variant the max relative
gradient error against no checkpointing, and (debug variant) whether the tensor each layer recomputes
from equals the input that layer saw in forward (a stale or overwritten reload shows there):

- plain:  the mode as shipped.
- synced: every copy followed by a device synchronize (no stream can race another). If plain is off and
          synced is not, the stream ordering is wrong; if both are off, the recomputation itself differs.
- check:  forward inputs kept on the device (clones), compared with what backward reloads, per layer.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from optkit.train import checkpointing as ck  # noqa: E402
from tests.train._reload_check import reload_mismatches  # noqa: E402
from tests.train._tiny import loss_and_grads, max_relative_error, tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--method", default="lora")
    args = parser.parse_args()
    net, _ = tiny_model("llama3_8b", args.method, f"model.num_layers={args.layers}", "model.dtype=bfloat16",
                        device="cuda")
    ids = torch.randint(0, 128256, (2, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    _, ref = loss_and_grads(net, ids)
    noise = max_relative_error(loss_and_grads(net, ids)[1], ref)
    print(f"no checkpointing run-to-run: {noise:.3g}")

    for mode in ("standard", "offload", "offload_double_buffer"):
        for variant in ("plain", "synced", "check"):
            if mode == "standard" and variant != "plain":
                continue
            errs, mismatches = [], []
            with contextlib.ExitStack() as stack:
                if variant == "synced":
                    stack.enter_context(synced_copies())
                if variant == "check":
                    mismatches = stack.enter_context(reload_mismatches())
                info = ck.enable_checkpointing(net, mode)
                stack.callback(ck.disable_checkpointing, net)
                for _ in range(3):
                    grads = loss_and_grads(net, ids)[1]
                    errs.append(max_relative_error(grads, ref))
            worst = sorted(((max_relative_error({k: grads[k]}, {k: ref[k]}), k) for k in ref), reverse=True)[:3]
            extra = f" reload mismatches (layer, max abs diff): {mismatches[:8]}" if variant == "check" else ""
            print(f"{mode:22s} {variant:6s} rel err per step: {['%.3g' % e for e in errs]}{extra} "
                  f"hits={info.get('offload_prefetch_hits')} blocking={info.get('offload_blocking_reloads')}"
                  f" worst (last step): {[(f'{e:.2g}', k.replace('base_model.model.model.', '')) for e, k in worst]}")


@contextlib.contextmanager
def synced_copies():
    """Every offloader copy followed by a device synchronize: no stream can race another."""
    real_copy = ck.LayerInputOffloader._copy

    def synced_copy(self, dst, src, after, device):
        done = real_copy(self, dst, src, after, device)
        torch.cuda.synchronize()
        return done

    ck.LayerInputOffloader._copy = synced_copy
    try:
        yield
    finally:
        ck.LayerInputOffloader._copy = real_copy

if __name__ == "__main__":
    main()
