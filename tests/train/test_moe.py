"""Sort-based MoE experts (optkit.train.moe) against HF's expert loop and a float64 reference.

Tolerances follow tests/kernels/_tolerances.py: the float64 reference (HF's eager experts run in float64, or
``reference_moe_experts``) is what the tests trust; our fp32 result may be off by at most 2x what HF's own fp32 path
makes (+ one ulp at the reference's scale). Inputs are fresh random tensors with odd sizes and unused experts.
"""

import copy
import functools

import pytest
import torch
from torch import nn

from optkit.config.compose import compose
from optkit.models import build_model
from optkit.opt.moe_sorted_routing import apply_moe_sorted_routing, remove_moe_sorted_routing
from optkit.train import moe as M
from optkit.train.method import apply_expert_lora
from tests.kernels._nf4_bound import assert_roundtrip_within_nf4_bound
from tests.kernels._tolerances import assert_close_to_reference
from tests.train.test_packing import HostSyncCounter


@functools.lru_cache(maxsize=None)
def _cfg(*overrides):
    # experts_implementation=eager: HF's per-expert loop is the baseline and, in float64, the reference
    return compose(
        ["model=tiny_qwen3_moe", "model.experts_implementation=eager", "opt.moe_sorted_routing=true", *overrides]
    )


def _model(seed=0):
    return build_model(_cfg().model, seed=seed).train()


def _routing(tokens, experts, top_k, gen, skip=()):
    """Random top-k routing that never picks the experts in ``skip`` (so some experts get no rows)."""
    scores = torch.rand(tokens, experts, generator=gen)
    scores[:, list(skip)] = -1
    weights, index = scores.topk(top_k, dim=-1)
    return index, weights.softmax(-1)


class FakeExperts(nn.Module):
    """HF-like 3D experts holder; ``transposed`` stores (E, in, out) like HF's is_transposed experts."""

    def __init__(self, experts, hidden, inter, transposed, gen, dtype=torch.float32):
        super().__init__()
        gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen, dtype=dtype) / hidden**0.5
        down = torch.randn(experts, hidden, inter, generator=gen, dtype=dtype) / inter**0.5
        self.is_transposed = transposed
        self.gate_up_proj = nn.Parameter(gate_up.transpose(1, 2).contiguous() if transposed else gate_up)
        self.down_proj = nn.Parameter(down.transpose(1, 2).contiguous() if transposed else down)
        self.act_fn = nn.SiLU()

    def out_in(self, name):
        weight = getattr(self, name)
        return weight.transpose(1, 2) if self.is_transposed else weight


def test_sort_by_expert_groups_rows_and_inverts():
    gen = torch.Generator().manual_seed(0)
    index, _ = _routing(37, 7, 3, gen, skip=(2, 5))
    routing = M.sort_by_expert(index, 7)
    flat = index.reshape(-1)
    counts = torch.bincount(flat, minlength=7)
    assert torch.equal(routing.offsets, counts.cumsum(0).to(torch.int32))
    order = routing.token_of_slot * 0  # rebuild the sorted slot ids from inverse
    order[routing.inverse] = torch.arange(flat.numel())
    assert torch.equal(flat[order], flat.sort(stable=True).values)  # expert-sorted
    assert torch.equal(routing.token_of_slot, order // 3)
    assert torch.equal(order, flat.argsort(stable=True))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("tokens,experts,top_k", [(37, 5, 2), (64, 8, 3), (1, 4, 1)])
def test_sorted_experts_match_the_float64_reference(tokens, experts, top_k, transposed):
    gen = torch.Generator().manual_seed(tokens + experts)
    hf = FakeExperts(experts, 24, 40, transposed, gen)
    ours = M.SortedExperts(hf)
    x = torch.randn(tokens, 24, generator=gen, requires_grad=True)
    index, weights = _routing(tokens, experts, top_k, gen, skip=(experts - 1,))
    weights.requires_grad_(True)

    def reference(dtype):
        args = [
            t.detach().to(dtype).requires_grad_(True)
            for t in (x, weights, hf.out_in("gate_up_proj"), hf.out_in("down_proj"))
        ]
        out = M.reference_moe_experts(args[0], index, args[1], args[2], args[3], hf.act_fn)
        return out, torch.autograd.grad(out, args, torch.ones_like(out))

    out = ours(x, index, weights)
    grads = torch.autograd.grad(out, (x, weights, ours.gate_up_proj, ours.down_proj), torch.ones_like(out))
    ref64, ref_grads = reference(torch.float64)
    torch32, torch_grads = reference(torch.float32)
    assert_close_to_reference(out, ref64, torch32, torch.float32, name="output")
    names = ("d_hidden", "d_router_weights", "d_gate_up_proj", "d_down_proj")
    for name, g, r, t in zip(names, grads, ref_grads, torch_grads):
        if transposed and name.endswith("proj"):
            r, t = r.transpose(1, 2), t.transpose(1, 2)  # the reference took (E, out, in) views
        assert_close_to_reference(g, r, t, torch.float32, name=name)


def _loss_logits_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def test_whole_model_loss_logits_and_grads_equal_hf():
    model = _model(seed=1)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (3, 29), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100
    ref = _loss_logits_grads(copy.deepcopy(model).double(), ids, labels)
    hf32 = _loss_logits_grads(model, ids, labels)
    log = apply_moe_sorted_routing(model, _cfg().opt)
    assert "2 experts modules" in log[0]
    ours = _loss_logits_grads(model, ids, labels)
    assert_close_to_reference(ours[0], ref[0], hf32[0], torch.float32, name="loss")
    assert_close_to_reference(ours[1], ref[1], hf32[1], torch.float32, name="logits")
    assert set(ours[2]) == set(ref[2])
    for name in ref[2]:
        assert_close_to_reference(ours[2][name], ref[2][name], hf32[2][name], torch.float32, name=name)


def test_one_host_sync_per_layer_instead_of_one_per_expert():
    """On CPU the slice-loop GEMM reads the offsets once per MoE layer; HF's loop syncs once per hit expert."""
    model = _model(seed=2)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    with HostSyncCounter() as hf_counter:
        model(input_ids=ids, use_cache=False)
    apply_moe_sorted_routing(model, _cfg().opt)
    with HostSyncCounter() as our_counter:
        model(input_ids=ids, use_cache=False)
    layers, experts, mask_check = 2, 8, 1  # mask_check: HF's create_causal_mask reads position ids once per forward
    assert our_counter.count == layers + mask_check
    # HF: a nonzero for the hit experts, then a torch.where per hit expert (80 slots over 8 experts: most are hit)
    assert hf_counter.count >= layers * (1 + experts // 2) + mask_check, hf_counter.count


def test_apply_and_remove_keep_parameters_and_restore_hf():
    model = _model(seed=3)
    keys = list(model.state_dict())
    original = model.model.layers[0].mlp.experts
    assert apply_moe_sorted_routing(model, _cfg("opt.moe_sorted_routing=false").opt) == []
    apply_moe_sorted_routing(model, _cfg().opt)
    swapped = model.model.layers[0].mlp.experts
    assert isinstance(swapped, M.SortedExperts) and swapped.gate_up_proj is original.gate_up_proj
    assert list(model.state_dict()) == keys
    assert apply_moe_sorted_routing(model, _cfg().opt)[0].endswith("nothing changed")  # already swapped
    remove_moe_sorted_routing(model)
    assert model.model.layers[0].mlp.experts is original
    dense = build_model(compose(["model=tiny_qwen3"]).model)
    assert apply_moe_sorted_routing(dense, _cfg().opt) == [
        "moe_sorted_routing: no MoE experts in this model; nothing changed"
    ]


def test_transformers4_module_list_experts_are_refused():
    holder = nn.Module()
    holder.mlp = nn.Module()
    holder.mlp.experts = nn.ModuleList([nn.Linear(4, 4)])
    with pytest.raises(NotImplementedError, match="transformers >= 5"):
        apply_moe_sorted_routing(holder, _cfg().opt)


def test_expert_lora_equals_merged_weights():
    gen = torch.Generator().manual_seed(4)
    hf = FakeExperts(6, 16, 24, False, gen)
    ours = M.SortedExperts(hf)
    ours.add_lora(rank=4, alpha=8)
    x = torch.randn(21, 16, generator=gen)
    index, weights = _routing(21, 6, 2, gen)
    torch.testing.assert_close(
        ours(x, index, weights), M.reference_moe_experts(x, index, weights, hf.gate_up_proj, hf.down_proj, hf.act_fn)
    )
    with torch.no_grad():  # B = 0 at start; make it non-zero to check the math
        ours.gate_up_lora_B.normal_(generator=gen)
        ours.down_lora_B.normal_(generator=gen)
    merged = [
        w + 2.0 * torch.bmm(getattr(ours, f"{p}_lora_B"), getattr(ours, f"{p}_lora_A"))
        for w, p in ((hf.gate_up_proj, "gate_up"), (hf.down_proj, "down"))
    ]
    ref64 = M.reference_moe_experts(x.double(), index, weights.double(), *[m.double() for m in merged], hf.act_fn)
    torch32 = M.reference_moe_experts(x, index, weights, *merged, hf.act_fn)
    assert_close_to_reference(ours(x, index, weights), ref64, torch32, torch.float32, name="lora output")


def test_expert_lora_follows_the_train_config_and_trains_only_adapters():
    model = _model(seed=5)
    assert apply_expert_lora(model, _cfg("train=full").train) == []
    assert apply_expert_lora(model, _cfg("train=lora").train) == []  # "experts" not among the targets
    log = apply_expert_lora(model, _cfg("train=lora", "train.lora_targets=[q_proj,experts]", "train.lora_r=4").train)
    assert "r=4" in log[0]
    experts = model.model.layers[1].mlp.experts
    assert not experts.gate_up_proj.requires_grad and experts.down_lora_A.requires_grad
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(5))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert experts.gate_up_proj.grad is None
    assert experts.gate_up_lora_B.grad.abs().sum() > 0 and experts.down_lora_B.grad.abs().sum() > 0


def test_expert_qlora_stores_nf4_and_differentiates_through_the_dequantized_weights():
    gen = torch.Generator().manual_seed(6)
    hf = FakeExperts(4, 64, 32, False, gen)
    dense = {name: hf.out_in(name).detach().clone() for name in M.PROJECTIONS}
    ours = M.SortedExperts(hf)
    held = ours.quantize_nf4()
    ours.add_lora(rank=8, alpha=16)
    assert held < sum(w.numel() for w in dense.values()) * 4 / 6  # ~4.5 bits per weight vs 32
    assert not any(name in dict(ours.named_parameters()) for name in M.PROJECTIONS)
    deq = {name: ours.quantized[name].dequantize() for name in M.PROJECTIONS}
    for name in M.PROJECTIONS:  # down is (4, 64, 32): a row is half a 64-block
        assert_roundtrip_within_nf4_bound(dense[name], deq[name], blocksize=64)
    x = torch.randn(19, 64, generator=gen, requires_grad=True)
    index, weights = _routing(19, 4, 2, gen)
    out = ours(x, index, weights)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, retain_graph=True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = M.reference_moe_experts(x_ref, index, weights, deq["gate_up_proj"], deq["down_proj"], hf.act_fn)
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, grad_ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert ours.gate_up_lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 64, 32), (3, 96, 64), (5, 48, 70), (2, 7, 9)])
@pytest.mark.parametrize("triton_interpret", ["1", "0"])  # optkit's kernel, then its PyTorch reference
def test_nf4_expert_weight_roundtrip_matches_the_original_weights(shape, dtype, triton_interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", triton_interpret)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])).to(dtype) * 0.05
    stored = M.NF4ExpertWeight(weight)
    out = stored.dequantize()
    assert out.dtype == dtype
    assert_roundtrip_within_nf4_bound(weight, out, blocksize=64)
    assert stored.nbytes() < weight.numel() * 0.6  # 4 bits + one fp32 absmax per 64 weights


@pytest.mark.gpu
def test_gpu_grouped_mm_path_matches_hf_at_qwen3_30b_a3b_shapes():
    """Real widths (H=2048, I=768, E=128, k=8), bf16: ours vs float64 HF eager, HF's bf16 loop as the same-dtype bar."""
    from optkit.measure.syncs import count_device_syncs

    dev = torch.device("cuda")
    cfg = compose(
        [
            "model=qwen3_moe_30b_a3b",
            "model.num_layers=1",
            "model.hf_config.vocab_size=1024",
            "model.experts_implementation=eager",
        ]
    )
    model = build_model(cfg.model, device=dev).train()
    block = model.model.layers[0].mlp
    x = torch.randn(2048, 2048, device=dev, dtype=torch.bfloat16)
    routed = block.gate(x)  # (router logits, top-k weights, top-k experts)
    weights, index = routed[-2], routed[-1]

    def run(experts, dtype):
        xs = x.detach().to(dtype).requires_grad_(True)
        out = experts(xs, index, weights.detach().to(dtype))
        (grad,) = torch.autograd.grad(out.float().square().sum(), xs)
        return out, grad

    ref64 = run(copy.deepcopy(block.experts).double(), torch.float64)
    hf_bf16 = run(block.experts, torch.bfloat16)
    ours = M.SortedExperts(block.experts)
    assert M.grouped_mm_usable(x, ours.gate_up_proj)
    got = run(ours, torch.bfloat16)
    assert_close_to_reference(got[0], ref64[0], hf_bf16[0], torch.bfloat16, name="output")
    assert_close_to_reference(got[1], ref64[1], hf_bf16[1], torch.bfloat16, name="d_hidden")
    assert count_device_syncs(lambda: run(ours, torch.bfloat16)) == 0
    assert count_device_syncs(lambda: run(block.experts, torch.bfloat16)) > 64  # HF's loop: per expert


@pytest.mark.gpu
def test_gpu_whole_model_loss_and_grads_match_hf_at_qwen3_30b_a3b_shapes():
    """One Qwen3-30B-A3B layer (H=2048, I=768, E=128, k=8), bf16, 2 x 1024 tokens, every weight trained: the
    sorted-routing model's loss, logits and every gradient (router and expert weights included) against HF's
    eager expert loop in float64, HF's bf16 loop as the same-dtype bar."""
    dev = torch.device("cuda")
    cfg = compose(
        [
            "model=qwen3_moe_30b_a3b",
            "model.num_layers=1",
            "model.hf_config.vocab_size=1024",
            "model.experts_implementation=eager",
            "opt.moe_sorted_routing=true",
        ]
    )
    model = build_model(cfg.model, device=dev).train()
    ids = torch.randint(0, 1024, (2, 1024), generator=torch.Generator().manual_seed(7)).to(dev)
    ref = _loss_logits_grads(copy.deepcopy(model).double(), ids, ids)
    hf_bf16 = _loss_logits_grads(model, ids, ids)
    apply_moe_sorted_routing(model, cfg.opt)
    assert isinstance(model.model.layers[0].mlp.experts, M.SortedExperts)
    ours = _loss_logits_grads(model, ids, ids)
    assert_close_to_reference(ours[0], ref[0], hf_bf16[0], torch.bfloat16, name="loss")
    assert_close_to_reference(ours[1], ref[1], hf_bf16[1], torch.bfloat16, name="logits")
    assert set(ours[2]) == set(ref[2]) and any(".experts." in name for name in ref[2])
    for name in ref[2]:
        assert_close_to_reference(ours[2][name], ref[2][name], hf_bf16[2][name], torch.bfloat16, name=name)
