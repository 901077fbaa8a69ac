"""train.distributed: one training step on several processes through torch.distributed (none | ddp | fsdp2).

A distributed point is launched by ``python -m torch.distributed.run`` (optkit.bench.launch builds the
command); every process runs the same point on its own device (GPU ``LOCAL_RANK`` with NCCL, or the CPU
with gloo) on its own slice of the global batch. ``train.batch_size`` is rows per process, so the global
batch is batch_size x world size and the gradient is the mean over it, as one process computes it on
the whole global batch (tests compare the two).

- ``ddp``: DistributedDataParallel. Every rank holds the whole model; gradients are all-reduced in
  buckets that overlap backward.
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every decoder layer, then on the root: parameters,
  gradients and optimizer state are sharded (``Shard(0)`` DTensors, LoRA adapters included); a layer's
  parameters are all-gathered right before its forward and its backward and freed after them; gradients
  are reduce-scattered. On a GPU the gathered parameters are bf16 and gradients are reduced in fp32
  (``MixedPrecisionPolicy``); on the CPU the model's dtype is kept. QLoRA's packed NF4 bytes (uint8) are
  sharded like any parameter and never cast: torch >= 2.12 takes integer tensors as sharded parameters
  and clamps mixed precision to floating-point ones; bitsandbytes gives a gathered weight its
  ``quant_state`` back from the ``Linear4bit`` module.

What optkit's optimizations see: FSDP2 puts the gathered, plain tensors on the modules for the length of
their forward and backward, and the kernels run inside those forwards, so they never see a DTensor;
fused LoRA reads its adapter weights from their modules on every use for the same reason.
``optkit.patch`` goes before ``fully_shard`` (``refuse_sharded`` says so otherwise): a module patch swaps in
after sharding would keep the sharded DTensor that FSDP2 no longer updates.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from optkit.data import Batch, make_batches
from optkit.train.method import decoder_layers

MODES = ("none", "ddp", "fsdp2")  # train.distributed
PACKED_SHARDS_TORCH = (2, 12)  # first torch whose FSDP2 takes uint8 parameters (QLoRA's packed NF4 weights)
TORCH_OPTIMIZERS = ("adamw", "adamw_fused")  # train.optimizer values that step DTensors (FSDP2's parameters)
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by torch.distributed.run for every process
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class World:
    """This process's place in the launch: rank, local rank (its GPU), world size, backend."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether torch.distributed.run started this process."""
    return all(name in os.environ for name in LAUNCH_ENV)


def current_world() -> World:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size(), dist.get_backend())


def init_world(device_name: str = "auto") -> World:
    """Join the process group of a torchrun launch (NCCL on GPU ``LOCAL_RANK``, gloo on the CPU); the
    one-process World when this process was not launched by torchrun."""
    import torch.distributed as dist

    if not launched():
        return World()
    _die_with_launcher()
    if not dist.is_initialized():
        on_gpu = device_name != "cpu" and torch.cuda.is_available()
        if on_gpu:
            local_rank = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local_rank)  # every later "cuda" (model, NVML, allocator) means this GPU
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return current_world()


def _die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so killing the launch's process group at a timeout
    does not reach the ranks: on Linux, a rank is killed when its launcher dies (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def close_world() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- what each rank trains


def local_batches(data_cfg, batch_size: int, vocab_size: int, n_batches: int, seed: int) -> List[Batch]:
    """This rank's ``batch_size`` rows of each global batch (batch_size x world size rows, made from the
    same seed on every rank): the ranks together train exactly what one process would on the global batch."""
    world = current_world()
    batches = make_batches(data_cfg, batch_size * world.size, vocab_size, n_batches, seed)
    if world.size == 1:
        return batches
    return [rows_of(b, world.rank * batch_size, batch_size) for b in batches]


def rows_of(batch: Batch, start: int, count: int) -> Batch:
    """Rows ``start:start+count`` of a batch; real tokens in proportion to the rows' trained labels (exact
    for fixed-length and padded rows, which is what the label mask counts)."""
    tensors = {k: v[start : start + count] for k, v in batch.tensors.items()}
    labels, all_labels = tensors["labels"], batch.tensors["labels"]
    trained, all_trained = int((labels != -100).sum()), int((all_labels != -100).sum())
    real = round(batch.real_tokens * trained / all_trained) if all_trained else 0
    rows = all_labels.shape[0]
    return Batch(tensors, real_tokens=real, padded_tokens=batch.padded_tokens * count // rows)


def unsupported_reason(train_cfg) -> Optional[str]:
    """Why this process cannot run ``train_cfg``'s distributed mode, or None."""
    mode = train_cfg.distributed
    if mode == "none":
        return None
    if not launched():
        return (
            f"train.distributed={mode} needs the processes torch.distributed.run starts: run it through "
            "`optkit bench ... bench.gpus=N` (or torchrun)"
        )
    if mode == "fsdp2" and train_cfg.optimizer not in TORCH_OPTIMIZERS:
        return (
            f"train.optimizer={train_cfg.optimizer} with train.distributed=fsdp2: bitsandbytes' 8-bit optimizers "
            "step plain tensors, FSDP2's parameters are DTensors; use train.optimizer=adamw or adamw_fused"
        )
    if mode == "fsdp2" and train_cfg.method == "qlora" and _torch_version() < PACKED_SHARDS_TORCH:
        return (
            f"train.method=qlora with train.distributed=fsdp2 needs torch>={'.'.join(map(str, PACKED_SHARDS_TORCH))} "
            f"(uint8 packed NF4 weights as sharded parameters; this is torch {torch.__version__}); the other known "
            "paths, bnb_4bit_quant_storage=bfloat16 kept out of the mixed-precision cast or torchao's NF4Tensor, "
            "are not implemented here. train.distributed=ddp runs QLoRA on this torch"
        )
    return None


def _torch_version() -> tuple:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


# --------------------------------------------------------------------------- wrapping


class DataParallel(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that reads unknown attributes through to the model (``model.config``, as
    fully_shard keeps them), so the point treats every mode's model alike."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not set yet (inside __init__): nothing to read through to
                raise
            return getattr(self.module, name)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (optkit.patch's record lives on it); any other model as it is."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def distribute(model: nn.Module, train_cfg, device: torch.device) -> nn.Module:
    """``model`` wrapped for train.distributed (none | ddp | fsdp2); call after optkit.patch and checkpointing,
    before the optimizer is built (FSDP2 replaces the parameters with sharded ones). A model built on the meta
    device (train.sharded_init) gets its shards on ``device`` here."""
    mode = train_cfg.distributed
    if mode == "none":
        return model
    if mode == "ddp":
        if device.type != "cuda":
            return DataParallel(model)
        # "cuda" without an index is the current device, which init_world set to this rank's GPU
        return DataParallel(
            model, device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
        )
    if mode == "fsdp2":
        shard(model, mixed_precision=device.type == "cuda")
        if train_cfg.sharded_init:
            materialize_shards(model, device)
        return model
    raise ValueError(f"train.distributed={mode!r} is not valid; choose one of: {', '.join(MODES)}")


def shard(model: nn.Module, mixed_precision: bool) -> nn.Module:
    """fully_shard every decoder layer, then the root (embeddings, final norm, LM head); in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def build_device(train_cfg, device: torch.device) -> torch.device:
    """Where the model is built: the meta device under train.sharded_init (``materialize_shards`` puts each
    rank's shards on ``device`` after fully_shard), else ``device``."""
    return torch.device("meta") if train_cfg.sharded_init else device


def materialize_shards(model: nn.Module, device: torch.device) -> None:
    """A model built on the meta device and sharded: each rank's shards and the buffers made on ``device`` and
    initialized as a plain build does (the family's ``_init_weights``, rotary frequencies included; LoRA A
    random, B zero as peft starts them), so no rank ever holds more than its shards of the model (Llama-3-70B
    in bf16 is 140 GB). Random values per shard: with the CPU's gloo each rank draws the same numbers for its
    shard (DTensor's offset-based generator needs CUDA), which changes nothing a benchmark measures."""
    model.to_empty(device=device)
    get_base_model = getattr(model, "get_base_model", None)
    hf = get_base_model() if get_base_model is not None else model
    with torch.no_grad():
        for module in hf.modules():
            hf._init_weights(module)
        for module in model.modules():
            if hasattr(module, "lora_A") and hasattr(module, "reset_lora_parameters"):
                for adapter in module.lora_A:
                    module.reset_lora_parameters(adapter, True)


def is_sharded(model: nn.Module) -> bool:
    """Whether fully_shard has been applied to ``model`` or one of its modules."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def refuse_sharded(model: nn.Module) -> None:
    """optkit.patch's guard: a sharded model cannot be patched correctly (see the module docstring)."""
    if is_sharded(model):
        raise RuntimeError(
            "optkit.patch: this model is already sharded by fully_shard (FSDP2); call optkit.patch(model, ...) "
            "before fully_shard: modules patched in after sharding would keep FSDP2's sharded parameters"
        )
