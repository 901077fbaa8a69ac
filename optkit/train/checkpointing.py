"""Gradient checkpointing modes (train.checkpointing): none | standard | offload | offload_double_buffer.

- ``standard``: HF's own mechanism (``gradient_checkpointing_enable``, non-reentrant): each decoder
  layer keeps its input on the GPU and is recomputed in backward.
- ``offload``: each decoder layer is one autograd Function (``_OffloadedLayer``) that runs the layer
  exactly as without checkpointing (grad mode on, so the same kernels are picked) but drops every saved
  tensor as it is made, and sends its input to pinned CPU memory on a side (copy) stream, ordered
  after the compute stream by an event; in backward the input is copied back into a fresh device
  tensor, the compute stream waits for that copy (exposed latency), and the layer is recomputed and
  differentiated with ``torch.autograd.grad``. The layer's trainable parameters are inputs of the
  Function, so layer 0 of a LoRA model (whose input needs no gradient) still gets its LoRA grads.
- ``offload_double_buffer``: as ``offload``, but the reload goes into one of two persistent device
  buffers, and while layer i recomputes and back-propagates from buffer i%2, layer i-1's input is
  already being copied into buffer (i-1)%2 on the copy stream. Streams are ordered only by events
  (no host sync): a copy waits for the event recorded when the previous user of its buffer finished
  its backward, and the compute stream waits for the event recorded after the copy. The two buffers
  are the extra memory this mode costs (reported in the returned dict).

Why a custom Function rather than torch.utils.checkpoint: non-reentrant checkpoint keeps the layer's
arguments referenced on the device until backward, which is exactly the tensor to move off it, and
saved_tensors_hooks would offload every saved activation rather than the one input per layer.

On CPU the offload modes run the same logic with synchronous copies (no streams), so their
gradients can be tested against no checkpointing. RNG state is captured in forward and restored for
the recomputation (dropout gives the same mask twice), as torch.utils.checkpoint does. Under
torch.compile the offload machinery is skipped by Dynamo (a graph break per layer); the layer
forwards it calls are compiled as their own frames.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from optkit.train.method import decoder_layers
from optkit.train.recompute import layer_recompute

MODES = ("none", "standard", "offload", "offload_double_buffer")  # train.checkpointing

# kwargs of HF decoder layers that would update a KV cache again when the layer is recomputed
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def enable_checkpointing(model: nn.Module, mode: str) -> Dict[str, Any]:
    """Switch the decoder layers of ``model`` (HF or peft-wrapped) to ``mode``; returns info for the row.

    For the offload modes the returned dict is live: the offloader fills in the byte counts when it
    first allocates its buffers (first training step), so read it after the steps.
    """
    if mode == "none":
        return {"checkpointing": "none"}
    if mode == "standard":
        # Non-reentrant checkpointing needs no input that requires grad, but HF turns on
        # enable_input_require_grads for every input_ids model anyway (as it does for users' Trainer runs), so the
        # first layer's input gradient is computed too: ~0.1% of a Llama-3-8B step, the same for every opt-set.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return {"checkpointing": "standard"}
    if mode not in MODES:
        raise ValueError(f"train.checkpointing={mode!r} is not valid; choose one of: {', '.join(MODES)}")
    layers = decoder_layers(model)
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise RuntimeError(
            "HF gradient checkpointing is on; call model.gradient_checkpointing_disable() before "
            f"train.checkpointing={mode}"
        )
    offloader = LayerInputOffloader(double_buffer=mode == "offload_double_buffer")
    offloader.info["checkpointing"] = mode
    for index, layer in enumerate(layers):
        if isinstance(layer.__dict__.get("forward"), OffloadedLayerForward):
            raise RuntimeError("offload checkpointing is already enabled; call disable_checkpointing(model) first")
        layer.forward = OffloadedLayerForward(layer, index, offloader)
    return offloader.info


def disable_checkpointing(model: nn.Module) -> None:
    """Undo enable_checkpointing (any mode)."""
    layers = decoder_layers(model)
    for layer in layers:
        if isinstance(layer.__dict__.get("forward"), OffloadedLayerForward):
            del layer.forward
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        model.gradient_checkpointing_disable()


class LayerInputOffloader:
    """Pinned host copies of every layer's input, and (double buffer) the two device reload buffers."""

    def __init__(self, double_buffer: bool):
        self.double_buffer = double_buffer
        self.host: Dict[int, Tensor] = {}  # layer index -> pinned host copy of its input
        self.offloaded: Dict[int, Optional[torch.cuda.Event]] = {}  # D2H copy done
        self.buffers: List[Tensor] = []  # double buffer: two device tensors of the layer-input shape
        self.ready: List[Optional[torch.cuda.Event]] = [None, None]  # H2D copy into buffer done
        self.free: List[Optional[torch.cuda.Event]] = [None, None]  # last reader of buffer done
        self.loaded = [-1, -1]  # layer index whose input buffer[slot] holds (or is receiving)
        self.pending: Dict[int, weakref.ref] = {}  # layer index -> token of the forward awaiting backward
        self._copy_stream: Optional[torch.cuda.Stream] = None
        self.info: Dict[str, Any] = {
            "offload_pinned_host_bytes": 0,
            "offload_device_buffer_bytes": 0,
            "offload_prefetch_hits": 0,
            "offload_blocking_reloads": 0,
        }

    # -- streams (CUDA only; on CPU every copy is synchronous and events are None)
    def _stream(self, device: torch.device) -> Optional[torch.cuda.Stream]:
        if device.type != "cuda":
            return None
        if self._copy_stream is None or self._copy_stream.device != device:
            self._copy_stream = torch.cuda.Stream(device=device)
        return self._copy_stream

    def _copy(self, dst: Tensor, src: Tensor, after: List[Optional[torch.cuda.Event]], device: torch.device):
        """dst <- src on the copy stream after the ``after`` events; returns the copy's done event."""
        stream = self._stream(device)
        if stream is None:
            dst.copy_(src)
            return None
        done = torch.cuda.Event()
        with torch.cuda.stream(stream):
            for event in after:
                if event is not None:
                    stream.wait_event(event)
            dst.copy_(src, non_blocking=True)
            done.record(stream)
        return done

    # -- forward: input -> host
    @torch.compiler.disable()
    def offload(self, index: int, hidden: Tensor) -> "_Pending":
        """Start copying layer ``index``'s input to host; the returned token lives until its backward."""
        pending = self.pending.get(index)
        if pending is not None and pending() is not None:
            raise RuntimeError(
                f"decoder layer {index} ran forward again before the backward of its previous forward: offload "
                "checkpointing keeps one host copy per layer. Call backward after each forward, or use "
                "train.checkpointing=standard for this loop"
            )
        token = _Pending()
        self.pending[index] = weakref.ref(token)
        self.loaded = [-1 if loaded == index else loaded for loaded in self.loaded]  # a new step's input
        host = self.host.get(index)
        if host is None or host.shape != hidden.shape or host.dtype != hidden.dtype:
            host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.device.type == "cuda")
            self.host[index] = host
            self.info["offload_pinned_host_bytes"] = sum(t.numel() * t.element_size() for t in self.host.values())
        produced = None
        if hidden.device.type == "cuda":
            produced = torch.cuda.Event()
            produced.record(torch.cuda.current_stream(hidden.device))
        self.offloaded[index] = self._copy(host, hidden.detach(), [produced], hidden.device)
        if hidden.device.type == "cuda":  # keep its memory from reuse until the copy stream read it
            hidden.record_stream(self._stream(hidden.device))
        return token

    # -- backward: host -> device
    @torch.compiler.disable()
    def reload(self, index: int, like: Dict[str, Any]) -> Tensor:
        device = like["device"]
        if not self.double_buffer:
            self.info["offload_blocking_reloads"] += 1
            hidden = torch.empty(like["shape"], dtype=like["dtype"], device=device)
            # hidden's block may have been freed by compute work still queued: the copy waits for it.
            queued = self._mark(device)
            self._wait(self._copy(hidden, self.host[index], [queued, self.offloaded[index]], device), device)
            return hidden
        self._ensure_buffers(like)
        slot = index % 2
        if self.loaded[slot] == index:
            self.info["offload_prefetch_hits"] += 1
        else:
            self.info["offload_blocking_reloads"] += 1
            self._fill(slot, index, device)
        self._wait(self.ready[slot], device)
        if index - 1 in self.host:  # next layer backward will need: copy it while this one computes
            self._fill(1 - slot, index - 1, device)
        return self.buffers[slot]

    @torch.compiler.disable()
    def release(self, index: int, device: torch.device) -> None:
        """Layer ``index``'s backward is queued: its buffer may be overwritten after this point."""
        if self.double_buffer:
            self.free[index % 2] = self._mark(device)

    def _fill(self, slot: int, index: int, device: torch.device) -> None:
        self.ready[slot] = self._copy(
            self.buffers[slot], self.host[index], [self.free[slot], self.offloaded[index]], device
        )
        self.loaded[slot] = index

    def _ensure_buffers(self, like: Dict[str, Any]) -> None:
        if self.buffers and self.buffers[0].shape == like["shape"] and self.buffers[0].dtype == like["dtype"]:
            return
        if self.buffers:  # shape changed: let queued copies into the old buffers finish before freeing them
            self._wait(self._mark(like["device"], self._stream(like["device"])), like["device"])
        self.buffers = [torch.empty(like["shape"], dtype=like["dtype"], device=like["device"]) for _ in range(2)]
        # The caching allocator may hand out blocks that compute work still queued on the compute stream
        # writes to (it orders reuse for that stream only); the copy stream must not write them before
        # that work is done. Without this the first reloads after allocation raced (H100: layers 2-3 got
        # corrupted inputs on the first step, gradients off by 1e4).
        allocated = self._mark(like["device"])
        self.ready, self.free, self.loaded = [None, None], [allocated, allocated], [-1, -1]
        self.info["offload_device_buffer_bytes"] = sum(t.numel() * t.element_size() for t in self.buffers)

    @staticmethod
    def _mark(device: torch.device, stream=None) -> Optional[torch.cuda.Event]:
        if device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(stream or torch.cuda.current_stream(device))
        return event

    @staticmethod
    def _wait(event: Optional[torch.cuda.Event], device: torch.device) -> None:
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)


def _drop(tensor: Tensor) -> None:
    return None


def _never_unpacked(packed: None) -> Tensor:
    raise RuntimeError("offload checkpointing: the forward-pass graph of a layer was used for backward")


class _Pending:
    """Alive while a layer's offloaded input still awaits its backward (a discarded graph frees it)."""


class _RngState:
    """CPU (+ the device's CUDA) RNG state at forward, replayed for the recomputation."""

    @torch.compiler.disable()
    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.devices = [device] if self.cuda is not None else []  # for torch.random.fork_rng

    @torch.compiler.disable()
    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class _OffloadedLayer(torch.autograd.Function):
    # Both are skipped by Dynamo (they drive streams, events and host buffers); the layer forward they
    # call through ``run`` is still compiled as its own frame under torch.compile.
    @staticmethod
    @torch.compiler.disable(recursive=False)
    def forward(ctx, run, offloader: LayerInputOffloader, index: int, hidden: Tensor, *params: Tensor):
        ctx.run, ctx.offloader, ctx.index = run, offloader, index
        ctx.saved_params = params  # leaf parameters: held by reference, nothing to offload
        ctx.like = {"shape": hidden.shape, "dtype": hidden.dtype, "device": hidden.device}
        ctx.rng = _RngState(hidden.device)
        ctx.pending = offloader.offload(index, hidden)
        # Run the layer as it runs without checkpointing: with grad on and inputs that require grad as
        # they do outside, because kernels are chosen by that (GPU SDPA picks its backend by whether q/k/v
        # require grad), and the recomputation in backward must see the activations the next layers saw.
        # Saved tensors are dropped as they are made: the graph is never used, so nothing is kept.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _never_unpacked):
            out = run(hidden.detach().requires_grad_(hidden.requires_grad))
        if not isinstance(out, Tensor):
            raise TypeError(f"offload checkpointing expects decoder layers that return a tensor, got {type(out)}")
        return out.detach()

    @staticmethod
    @torch.compiler.disable(recursive=False)
    def backward(ctx, grad_out: Tensor):
        offloader, device = ctx.offloader, ctx.like["device"]
        need_hidden = ctx.needs_input_grad[3]
        hidden = offloader.reload(ctx.index, ctx.like).detach().requires_grad_(need_hidden)
        # The rerun's output is only the root of autograd.grad below (its value is never read): marked as a
        # layer recompute, so optimizations may skip what only that value needs (optkit/train/recompute.py).
        with torch.random.fork_rng(devices=ctx.rng.devices), torch.enable_grad(), layer_recompute():
            ctx.rng.restore()
            out = ctx.run(hidden)
        params = ctx.saved_params
        inputs = ([hidden] if need_hidden else []) + [p for p, need in zip(params, ctx.needs_input_grad[4:]) if need]
        grads = list(torch.autograd.grad(out, inputs, grad_out, allow_unused=True))
        del out, hidden
        offloader.release(ctx.index, device)
        ctx.pending = None  # this layer's host copy may be overwritten by the next forward
        grad_hidden = grads.pop(0) if need_hidden else None
        grad_params = [grads.pop(0) if need else None for need in ctx.needs_input_grad[4:]]
        return (None, None, None, grad_hidden, *grad_params)


class OffloadedLayerForward:
    """Instance-level forward of a decoder layer under the offload modes."""

    def __init__(self, layer: nn.Module, index: int, offloader: LayerInputOffloader):
        self.layer, self.index, self.offloader = layer, index, offloader

    @torch.compiler.disable(recursive=False)  # see _OffloadedLayer
    def __call__(self, *args, **kwargs):
        layer = self.layer
        original = type(layer).forward
        if not (layer.training and torch.is_grad_enabled()):
            return original(layer, *args, **kwargs)
        for key in _CACHE_KWARGS:  # the recomputation must not append to a KV cache a second time
            if kwargs.get(key) is not None:
                kwargs[key] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")

        def run(h: Tensor) -> Tensor:
            return original(layer, h, *args, **kwargs)

        params = [p for p in layer.parameters() if p.requires_grad]
        return _OffloadedLayer.apply(run, self.offloader, self.index, hidden, *params)
