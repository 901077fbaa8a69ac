"""opt.tiled_mlp: each decoder layer's MLP runs over chunks of tokens, and backward recomputes one chunk at
a time, so the MLP's intermediate (gate, up, their product: tokens x intermediate_size each) never exists
for all tokens at once. At Llama-3-8B and 64k tokens one such tensor is 64k x 14336 x 2 bytes = 1.8 GB in
bf16, several per layer; tiled, a chunk of ``opt.tiled_mlp_chunk_tokens`` costs that over 64k/chunk.

What it costs: the MLP forward runs once more (in backward, chunk by chunk). The MLP is position-wise, so
chunks of the flattened tokens give exactly the plain MLP's function; the autograd Function saves only
the MLP's input. Whatever computes the MLP (HF's module, optkit's SwiGLU/GeGLU module, fused LoRA's
forward, peft's LoRA layers) is what each chunk calls, so tiling composes with them: it wraps the MLP's
forward as installed when it is applied (registry order puts it after them). Sequences of at most one
chunk call the MLP unchanged. The RNG state is replayed for the recomputation (LoRA dropout draws the
same masks twice), and autocast is re-entered as it was.

Trainable parameters are inputs of the Function (their gradients are summed over the chunks, in float32
for lower-precision parameters), so the outer autograd graph, gradient checkpointing included, sees
them as usual. MoE blocks are left alone (routing is per token, their experts have their own path).
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from optkit.config.schema import OptConfig
from optkit.opt.edits import hf_model_of, is_moe, record, state_of
from optkit.train.method import decoder_layers


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed_rng(state, device: torch.device):
    """The RNG as it was when forward began (restored afterwards), so recomputed dropout matches."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else [], device_type=device.type):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def _autocast_state(device: torch.device):
    kind = device.type
    return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


class _TiledMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, forward: Callable[[Tensor], Tensor], chunk_tokens: int, *params: Tensor) -> Tensor:
        ctx.forward, ctx.chunk_tokens, ctx.params = forward, chunk_tokens, params
        ctx.rng = _rng_state(x.device)
        ctx.autocast = _autocast_state(x.device)
        ctx.save_for_backward(x)
        tokens = x.reshape(1, -1, x.shape[-1])
        out: Optional[Tensor] = None
        for start in range(0, tokens.shape[1], chunk_tokens):
            y = forward(tokens[:, start : start + chunk_tokens])
            if out is None:
                out = y.new_empty((1, tokens.shape[1], y.shape[-1]))
            out[:, start : start + chunk_tokens] = y
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[0]
        wanted = [i for i, p in enumerate(ctx.params) if ctx.needs_input_grad[3 + i]]
        tokens = x.reshape(1, -1, x.shape[-1])
        grads = grad_out.reshape(1, tokens.shape[1], -1)
        dx = torch.empty_like(tokens) if needs_x else None
        dparams: List[Optional[Tensor]] = [None] * len(ctx.params)
        kind, autocast_on, autocast_dtype = ctx.autocast
        with _replayed_rng(ctx.rng, x.device), torch.autocast(kind, dtype=autocast_dtype, enabled=autocast_on):
            for start in range(0, tokens.shape[1], ctx.chunk_tokens):
                stop = start + ctx.chunk_tokens
                chunk = tokens[:, start:stop].detach().requires_grad_(needs_x)
                with torch.enable_grad():
                    y = ctx.forward(chunk)
                inputs = ([chunk] if needs_x else []) + [ctx.params[i] for i in wanted]
                found = torch.autograd.grad(y, inputs, grads[:, start:stop], allow_unused=True)
                if needs_x:
                    dx[:, start:stop] = found[0]
                    found = found[1:]
                for i, g in zip(wanted, found):
                    if g is not None:
                        dparams[i] = _accumulate(dparams[i], g)
        dparams = [None if g is None else g.to(p.dtype) for g, p in zip(dparams, ctx.params)]
        return (dx.view_as(x) if needs_x else None, None, None, *dparams)


def _accumulate(total: Optional[Tensor], grad: Tensor) -> Tensor:
    """Sum of chunk gradients, in float32 when the parameter's dtype is narrower (chunks add rounding)."""
    grad = grad.float() if grad.dtype in (torch.bfloat16, torch.float16) else grad
    return grad.clone() if total is None else total.add_(grad)


def tiled_mlp(x: Tensor, forward: Callable[[Tensor], Tensor], chunk_tokens: int, params: Sequence[Tensor]) -> Tensor:
    """``forward(x)`` computed over chunks of ``chunk_tokens`` tokens (x's leading dims flattened), recomputed
    chunk by chunk in backward; ``params`` are the trainable parameters ``forward`` uses."""
    if x.shape[:-1].numel() <= chunk_tokens:
        return forward(x)
    return _TiledMLPFunction.apply(x, forward, chunk_tokens, *params)


def reference_mlp(x: Tensor, forward: Callable[[Tensor], Tensor]) -> Tensor:
    """The plain MLP the tiled one must equal: one call over every token."""
    return forward(x)


class TiledForward:
    """``forward`` of a decoder layer's MLP under opt.tiled_mlp (recognized by type)."""

    def __init__(self, module: nn.Module, forward: Callable[..., Tensor], chunk_tokens: int):
        self.module, self.forward, self.chunk_tokens = module, forward, chunk_tokens

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs:  # a call pattern the MLP alone knows: leave it whole
            return self.forward(x, *args, **kwargs)
        params = [p for p in self.module.parameters() if p.requires_grad]
        return tiled_mlp(x, self.forward, self.chunk_tokens, params)


def apply_tiled_mlp(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    """Wrap the MLP forward of every decoder layer of ``model`` (HF or peft-wrapped); returns the log."""
    if is_moe(hf_model_of(model)):
        return ["tiled_mlp: skipped (MoE blocks route per token; their experts have their own path)"]
    chunk = opt_cfg.tiled_mlp_chunk_tokens
    layers = decoder_layers(model)
    wrapped = 0
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or isinstance(mlp.__dict__.get("forward"), TiledForward):
            continue
        if state_of(model) is not None:  # its own claim: fused LoRA may own this forward, tiling wraps it
            record(model, mlp, "forward", "tiled_mlp", claim_key=f"tiled_mlp:layer{index}")
        mlp.forward = TiledForward(mlp, mlp.forward, chunk)
        wrapped += 1
    return [f"tiled_mlp: MLP over chunks of {chunk} tokens, recomputed in backward, in {wrapped}/{len(layers)} layers"]
