"""QLoRA's quantization step: decoder-block linears -> bitsandbytes ``Linear4bit`` (NF4, double-quant).

The model is quantized as built: random weights go through exactly the bitsandbytes code path real
ones would (blockwise absmax over 64 weights, nested 8-bit absmax over 256 blocks), so memory and
speed are those of a real QLoRA run. Only linears inside the decoder layers are quantized, as
``BitsAndBytesConfig(load_in_4bit=True)`` does for these families (embeddings and LM head stay in the
model dtype); MoE routers are skipped because quantizing the expert choice changes the model's
routing, and bitsandbytes users skip them too.

Works on CUDA and on CPU (bitsandbytes >= 0.45 quantizes and dequantizes NF4 there). On CPU, bitsandbytes
0.50's dequantize_4bit is wrong where a weight row is not a whole number of 64-blocks; the tiny models'
linears are whole blocks (tests/kernels/test_nf4_quantize.py checks their round trips through it).
"""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch
from torch import nn

# Leaf names of linears that route tokens in MoE blocks (Qwen2/3-MoE, Mixtral); kept in full precision.
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})


def _import_bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "train.method=qlora needs bitsandbytes: pip install 'optkit[quant]' (bitsandbytes>=0.45)"
        ) from exc
    return bnb


def to_linear4bit(
    linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None
) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``linear``'s weight quantized on its device (bias shared)."""
    bnb = _import_bnb()
    weight = linear.weight
    # Built on the meta device so no throwaway full-precision weight is allocated and initialized.
    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype or weight.dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=torch.uint8,
        device="meta",
    )
    params = bnb.nn.Params4bit(
        weight.data,
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=torch.uint8,
        module=quantized,
    )
    quantized.weight = params.to(weight.device)  # an unquantized Params4bit quantizes when moved
    if linear.bias is not None:
        quantized.bias = linear.bias
    quantized.train(linear.training)
    return quantized


def quantize_linears(
    blocks: Iterable[nn.Module],
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
    prefix: str = "layers",
    first_index: int = 0,
) -> List[str]:
    """Replace every ``nn.Linear`` inside ``blocks`` (the decoder layers) by ``Linear4bit``, in place.

    Returns the qualified names replaced. Each full-precision weight is freed as soon as its
    quantized copy exists, so the peak is the model plus one layer's quantization temporaries.
    """
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"train.qlora_quant_type={quant_type!r} is not valid; choose nf4 or fp4")
    bnb = _import_bnb()
    replaced = []
    for index, block in enumerate(blocks, start=first_index):
        targets = [
            (name, module)
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear)
            and not isinstance(module, bnb.nn.Linear4bit)
            and name.rsplit(".", 1)[-1] not in ROUTER_NAMES
        ]
        for name, linear in targets:
            parent_name, _, leaf = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, leaf, to_linear4bit(linear, quant_type, double_quant, compute_dtype))
            replaced.append(f"{prefix}.{index}.{name}")
    return replaced


class LayerQuantizer:
    """QLoRA's quantization one decoder layer at a time: the ``each_layer`` of
    ``optkit.models.build_model_layerwise``. Each layer's linears become ``Linear4bit`` as soon as the layer
    is on the device, so its full-precision weights are freed before the next layer exists there: the
    setup peak is the quantized model plus one layer, not the full-precision model."""

    def __init__(self, train_cfg, compute_dtype: torch.dtype):
        self.train_cfg, self.compute_dtype = train_cfg, compute_dtype
        self.replaced: List[str] = []

    def __call__(self, index: int, layer: nn.Module) -> None:
        cfg = self.train_cfg
        self.replaced += quantize_linears(
            [layer], cfg.qlora_quant_type, cfg.qlora_double_quant, self.compute_dtype, first_index=index
        )

    def finish(self, model: nn.Module) -> nn.Module:
        """The built model, marked as loaded in 4 bit (peft then wraps its Linear4bit with 4-bit LoRA layers)."""
        if not self.replaced:
            raise ValueError("train.method=qlora found no nn.Linear inside the decoder layers to quantize")
        model.is_loaded_in_4bit = True
        return model
