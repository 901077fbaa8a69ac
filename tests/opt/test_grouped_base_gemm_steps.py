"""opt.fused_lora_grouped_gemm over training steps as the bench runs them: what a step does, grouped vs not (CPU).

A tiny Llama (2 layers, odd widths, LoRA and QLoRA) with standard checkpointing and torch's foreach AdamW takes
three steps split into forward / backward / optimizer phases as optkit.bench.point's ``_one_step`` splits them.
The last step is compared op by op (a TorchDispatchMode log of every aten op and the bytes of every copy-like
op's output) between the grouped and the ungrouped model:

- nothing is rebuilt per step: no weight is re-homed after patching, no NF4 (group) dequantizer is prepared
  again after the first step, the dense base weights keep their storage and version counter (the optimizer
  never touches them), and a QLoRA step launches exactly the dequantizes the design says (one group launch per
  group and pass, one single launch for O and down per pass; 21 single launches per layer ungrouped);
- no copy-like op produces anything of a base weight's or a group's shape;
- forward and optimizer copy the same bytes grouped and ungrouped, the optimizer phase dispatches the same ops,
  and no phase dispatches more ops that make the host wait for the device: an optimizer-phase time that differs
  on a GPU is not work the grouping adds there, nor a synchronization it adds anywhere;
- backward copies exactly one thing more: the Q/K/V gradients concatenated for the one dx GEMM, tokens x
  sum(out) per layer (Llama-3-8B, 4096 tokens: 4096 x 6144 bf16 = 50 MB written and read per layer, 3.2 GB a
  step, ~1.2 ms of an H100's bandwidth).
"""

from __future__ import annotations

import collections
import copy
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from optkit.opt import grouped_base_gemm
from optkit.opt.patcher import patch
from optkit.train.checkpointing import enable_checkpointing
from optkit.train.method import decoder_layers
from tests.train._tiny import one_thread, tiny_model, token_batch  # noqa: F401

nf4 = importlib.import_module("optkit.kernels.nf4_dequantize")
LAYERS, TOKENS, STEPS = 2, 8, 3
ODD = (f"model.num_layers={LAYERS}", "model.hf_config.hidden_size=90", "model.hf_config.intermediate_size=112")
ODD += ("model.hf_config.num_attention_heads=6", "model.hf_config.num_key_value_heads=2", "model.hf_config.head_dim=10")
QKV_OUT = 6 * 10 + 2 * 2 * 10  # Q + K + V widths of ODD
COPY_OPS = {"copy_", "clone", "cat", "stack", "_to_copy", "index_select", "expand_copy", "_reshape_copy"}
# Ops that make the host wait for a CUDA device (a value read back, or an output size that depends on values).
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "_unique2", "unique_dim"}


class _StepLog(TorchDispatchMode):
    """Every aten op per phase, and (shape, bytes) of every copy-like op's output."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.ops = collections.Counter()
        self.copies = []  # (phase, op, shape, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[(self.phase, name)] += 1
        if name in COPY_OPS:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.copies.append((self.phase, name, tuple(t.shape), t.numel() * t.element_size()))
        return out

    def copied_bytes(self, phase):
        return sum(nbytes for p, _, _, nbytes in self.copies if p == phase)


def _base_weights(net):
    """{shape} of every base weight (dequantized shape for 4-bit) and of every group's stacked operand."""
    shapes = set()
    for layer in decoder_layers(net):
        groups = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",)]
        modules = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
        for names in groups:
            rows = []
            for name in names:
                base = modules[name].base_layer
                state = getattr(base.weight, "quant_state", None)
                shape = tuple(state.shape) if state is not None else tuple(base.weight.shape)
                shapes.add(shape)
                rows.append(shape[0])
            shapes |= {(sum(rows), shape[1]), (len(rows), rows[0], shape[1])}
    return shapes


def _train(net, monkeypatch):
    """STEPS bench-like steps; returns the last step's log and per-step counters of what must not recur."""
    enable_checkpointing(net, "standard")
    net.train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], foreach=True)
    counts = collections.Counter()

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(grouped_base_gemm, "_rehome", counted("rehome", grouped_base_gemm._rehome))
    monkeypatch.setattr(nf4, "_launch_group", counted("group launch", nf4._launch_group))
    monkeypatch.setattr(nf4, "_launch", counted("single launch", nf4._launch))
    for cls in (nf4.NF4Dequantizer, nf4.NF4GroupDequantizer):
        monkeypatch.setattr(cls, "__init__", counted(f"{cls.__name__} prepared", cls.__init__))
    per_step = []
    for step in range(STEPS):
        ids = token_batch(step)[:, :TOKENS]
        counts.clear()
        log = _StepLog()
        with log:
            loss = net(input_ids=ids, labels=ids, use_cache=False).loss
            log.phase = "backward"
            loss.backward()
            log.phase = "optimizer"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        per_step.append(dict(counts))
    return log, per_step


def _dense_weights(net):
    return [p for n, p in net.named_parameters() if "base_layer.weight" in n and p.is_floating_point()]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_grouped_step_rebuilds_nothing_and_copies_only_the_qkv_grads_more(method, monkeypatch):
    net, _ = tiny_model("tiny_llama", method, *ODD)
    ungrouped = patch(copy.deepcopy(net), {"fused_lora": True, "fused_lora_grouped_gemm": False})
    grouped = patch(net, {"fused_lora": True, "fused_lora_grouped_gemm": True})
    dense = _dense_weights(grouped)
    before = [(w.data_ptr(), w._version) for w in dense]
    off_log, off_steps = _train(ungrouped, monkeypatch)
    on_log, on_steps = _train(grouped, monkeypatch)

    for counts in on_steps[1:]:  # steady state: the first step may prepare dequantizers, later ones must not
        assert not {k: v for k, v in counts.items() if "prepared" in k or k == "rehome"}, counts
    assert [(w.data_ptr(), w._version) for w in dense] == before, "base weights moved or written during training"
    if method == "qlora":
        passes = 3  # forward, checkpoint recompute, backward
        assert on_steps[-1]["group launch"] == 2 * passes * LAYERS, on_steps[-1]  # Q/K/V and gate/up groups
        assert on_steps[-1]["single launch"] == 2 * passes * LAYERS, on_steps[-1]  # O and down
        assert off_steps[-1]["single launch"] == 7 * passes * LAYERS, off_steps[-1]

    weight_shapes = _base_weights(grouped)
    weight_copies = [c for c in on_log.copies if c[2] in weight_shapes]
    assert not weight_copies, f"copies of base-weight shape in a steady-state step: {weight_copies}"
    for phase in ("forward", "optimizer"):
        assert on_log.copied_bytes(phase) == off_log.copied_bytes(phase), phase
    optimizer_ops = {k: v for k, v in on_log.ops.items() if k[0] == "optimizer"}
    assert optimizer_ops == {k: v for k, v in off_log.ops.items() if k[0] == "optimizer"}
    syncing = [({k: v for k, v in log.ops.items() if k[1] in SYNCING_OPS}) for log in (on_log, off_log)]
    assert syncing[0] == syncing[1], syncing
    qkv_grads = LAYERS * 2 * TOKENS * QKV_OUT * 4  # float32 (batch 2): every layer's input needs a gradient here
    assert on_log.copied_bytes("backward") - off_log.copied_bytes("backward") == qkv_grads
