"""Packed attention (optkit.train.packing): packed == each example alone, and per-layer vs per-batch metadata syncs.

Numerics follow tests/kernels/_tolerances.py: the examples run one by one in float64 are the reference; the packed fp32
result may be off by at most 2x what the same per-example run makes in fp32 (+ one ulp at the reference's scale).
Syncs on CPU are counted with a dispatch mode that sees every aten op which would force a device->host sync on CUDA
(nonzero, _local_scalar_dense = .item()/bool()/int(), an explicit copy to the host); the gpu test counts real ones.
"""

import copy
import functools
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from optkit.config.compose import compose
from optkit.data.packing import draw_packed_rows, packed_batch, padded_batch
from optkit.models import build_model
from optkit.opt.packed_metadata_cache import apply_packed_metadata_cache
from optkit.train import packing as P
from tests.kernels._tolerances import assert_close_to_reference

aten = torch.ops.aten
SEQ_LEN = 96


class HostSyncCounter(TorchDispatchMode):
    """Counts aten calls that synchronize a CUDA device with the host (the same calls on CPU tensors)."""

    SYNCING = {aten.nonzero.default, aten._local_scalar_dense.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # an explicit host copy: _to_copy to the CPU that keeps the dtype (a cast that names the device is not one)
        to_host = (
            func is aten._to_copy.default
            and kwargs.get("device") == torch.device("cpu")
            and kwargs.get("dtype") in (None, args[0].dtype)
        )
        if func in self.SYNCING or to_host:
            self.count += 1
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _cfg(model: str = "tiny_qwen3", layers: int = 2, cache: bool = True):
    # HF's default experts implementation on CPU (grouped_mm) has no float64 kernel for the reference: use its loop
    experts = ["model.experts_implementation=eager"] if model.endswith("moe") else []
    return compose(
        [
            f"model={model}",
            f"model.num_layers={layers}",
            f"opt.packed_metadata_cache={str(cache).lower()}",
            *experts,
            "data=packed",
            f"data.seq_len={SEQ_LEN}",
            "data.length_dist=uniform",
            "data.min_len=2",
            "data.max_len=40",
        ]
    )


def _model(model="tiny_qwen3", layers=2, dtype=torch.float32):
    return build_model(_cfg(model, layers).model).to(dtype).train()


def _batch(seed=0, batch_size=3):
    return packed_batch(batch_size, SEQ_LEN, 512, torch.Generator().manual_seed(seed), _cfg().data)


def _per_example_logits(model, batch, rows):
    """Each example run alone (HF's default attention, no packing), its logits put back at its packed positions."""
    ids, pos = batch.tensors["input_ids"], batch.tensors["position_ids"]
    out = torch.zeros(*ids.shape, model.config.vocab_size, dtype=next(model.parameters()).dtype)
    for r, row in enumerate(rows):
        start = 0
        for length in row:
            assert pos[r, start] == 0
            out[r, start : start + length] = model(
                input_ids=ids[r : r + 1, start : start + length], use_cache=False
            ).logits[0]
            start += length
    return out


def _real_mask(batch, rows):
    mask = torch.zeros_like(batch.tensors["input_ids"], dtype=torch.bool)
    for r, row in enumerate(rows):
        mask[r, : sum(row)] = True
    return mask


@pytest.mark.parametrize("cache", [False, True], ids=["per_layer", "per_batch"])
@pytest.mark.parametrize("model_name", ["tiny_qwen3", "tiny_qwen3_moe"])
def test_packed_logits_equal_each_example_alone(model_name, cache):
    model = _model(model_name)
    batch, rows = _batch(1, batch_size=2), draw_packed_rows(2, SEQ_LEN, torch.Generator().manual_seed(1), _cfg().data)
    real = _real_mask(batch, rows)
    ref64 = _per_example_logits(copy.deepcopy(model).double(), batch, rows)[real]
    torch32 = _per_example_logits(model, batch, rows)[real]
    if cache:
        apply_packed_metadata_cache(model, _cfg(cache=True).opt)
    else:
        P.install_packed_attention(model)
    with torch.no_grad():
        packed = model(**batch.tensors).logits[real]
    assert_close_to_reference(packed, ref64, torch32, torch.float32, name=f"packed logits ({model_name})")


def _loss_grads(model, **tensors):
    model.zero_grad(set_to_none=True)
    loss = model(**tensors, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cache", [False, True], ids=["per_layer", "per_batch"])
def test_packed_loss_and_grads_equal_the_padded_examples(cache):
    """Same examples, same targets: the packed loss and every gradient equal the padded batch's (HF's sdpa + mask)."""
    model = _model()
    gen_seed = 2
    padded = padded_batch(3, SEQ_LEN, 512, torch.Generator().manual_seed(gen_seed), _cfg().data)
    packed = _batch(gen_seed)
    ref_loss, ref_grads = _loss_grads(copy.deepcopy(model).double(), **padded.tensors)
    torch_loss, torch_grads = _loss_grads(model, **padded.tensors)
    if cache:
        apply_packed_metadata_cache(model, _cfg(cache=True).opt)
    else:
        P.install_packed_attention(model)
    loss, grads = _loss_grads(model, **packed.tensors)
    assert_close_to_reference(loss, ref_loss, torch_loss, torch.float32, name="loss")
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert_close_to_reference(grads[name], ref_grads[name], torch_grads[name], torch.float32, name=name)


def _syncs_and_stats(model, batch):
    stats = P.packing_stats(model)
    stats.reset()
    with HostSyncCounter() as counter:
        model(**batch.tensors).loss.backward()
    assert stats.loop_kernel_calls == len(P.decoder_stack(model).layers) and stats.varlen_kernel_calls == 0
    return counter.count, stats.per_layer_rebuilds, stats.per_batch_builds


@pytest.mark.parametrize("layers", [2, 4])
def test_metadata_is_rebuilt_per_layer_by_the_baseline_and_once_per_batch_by_the_cache(layers):
    model, batch = _model(layers=layers), _batch(3)
    P.install_packed_attention(model)
    syncs, rebuilds, builds = _syncs_and_stats(model, batch)
    # per layer: HF's `if _is_packed_sequence`, the nonzero in prepare_fa_kwargs, int(max_length), and (CPU kernel
    # only) the boundaries as host ints; 3 per layer with torch's varlen kernel on GPU
    assert (rebuilds, builds) == (layers, 0)
    assert syncs == 4 * layers
    apply_packed_metadata_cache(model, _cfg(cache=True).opt)
    syncs, rebuilds, builds = _syncs_and_stats(model, batch)
    assert (rebuilds, builds) == (0, 1)
    assert syncs == 1  # the one host copy of position_ids


def test_both_metadata_builders_agree():
    batch = _batch(4, batch_size=4)
    pos = batch.tensors["position_ids"]
    once = P.build_packed_metadata(pos)
    hf = P.rebuild_metadata_like_hf(pos, need_host_boundaries=True)
    assert once.boundaries == hf.boundaries
    assert torch.equal(once.cu_seqlens, hf.cu_seqlens) and once.cu_seqlens.dtype == torch.int32
    lengths = [b - a for a, b in zip(once.boundaries[:-1], once.boundaries[1:])]
    assert once.max_seqlen == hf.max_seqlen == max(lengths)
    assert once.boundaries[-1] == pos.numel()


def test_rows_of_whole_sequences_attend_causally():
    """position_ids that never restart inside a row: each row is one causal sequence."""
    model = _model()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        P.install_packed_attention(model)
        arange = torch.arange(24).expand(2, 24)
        torch.testing.assert_close(model(input_ids=ids, position_ids=arange).logits, ref, rtol=1e-5, atol=1e-5)
    assert P.packing_stats(model).per_layer_rebuilds == 2


@pytest.mark.parametrize("cache", [False, True], ids=["per_layer", "per_batch"])
def test_unpacked_batches_run_hf_attention_unchanged(cache):
    """Padded rows (attention_mask) and plain rows (no position_ids) take the model's own attention and mask."""
    model = _model()
    padded = padded_batch(2, SEQ_LEN, 512, torch.Generator().manual_seed(6), _cfg().data)
    ids = padded.tensors["input_ids"]
    with torch.no_grad():
        refs = [model(**padded.tensors, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits]
        if cache:
            apply_packed_metadata_cache(model, _cfg(cache=True).opt)
        else:
            P.install_packed_attention(model)
        outs = [model(**padded.tensors, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits]
        assert model.config._attn_implementation == "sdpa"
        for out, ref in zip(outs, refs):
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
        stats = P.packing_stats(model)
        assert stats.per_layer_rebuilds == stats.per_batch_builds == stats.loop_kernel_calls == 0
        model(**_batch(6).tensors)  # a packed batch switches to packed attention again
        assert model.config._attn_implementation == P.ATTN_NAME


def test_remove_restores_the_model():
    model = _model()
    batch = _batch(6)
    with torch.no_grad():
        before_logits = model(**batch.tensors, use_cache=False).logits
    before = model.config._attn_implementation
    log = apply_packed_metadata_cache(model, _cfg(cache=True).opt)
    assert any("per layer" in line for line in log) and any("once per forward" in line for line in log)
    assert apply_packed_metadata_cache(model, _cfg(cache=True).opt) == []  # idempotent
    assert apply_packed_metadata_cache(model, _cfg(cache=False).opt) == []  # switch off: no change
    P.remove_packed_attention(model)
    assert model.config._attn_implementation == before
    base = P.decoder_stack(model)
    assert not base._forward_pre_hooks
    assert not any(hasattr(layer.self_attn, "_optkit_packing_stats") for layer in base.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch.tensors, use_cache=False).logits, before_logits, rtol=0, atol=0)


def _fake_varlen(signature: str):
    """Stand-ins for torch's varlen_attn with the 2.10 (is_causal) and 2.12 (window_size, enable_gqa, scale) APIs."""
    calls = []

    def compute(q, k, v, cu_q, max_q, scale):
        meta = P.PackedMetadata(cu_q, max_q, tuple(cu_q.tolist()))
        return P._varlen_by_example(q, k, v, meta, scale)

    def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        assert is_causal and key.shape[1] == query.shape[1], "2.10 needs causal and as many kv heads as q heads"
        calls.append("2.10")
        return compute(query, key, value, cu_seq_q, max_q, query.shape[-1] ** -0.5)

    def varlen_2_12(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        *,
        return_aux=None,
        scale=None,
        window_size=(-1, -1),
        enable_gqa=False,
    ):
        assert window_size == (-1, 0) and (enable_gqa or key.shape[1] == query.shape[1])
        calls.append("2.12")
        return compute(query, key, value, cu_seq_q, max_q, scale)

    return {"2.10": varlen_2_10, "2.12": varlen_2_12}[signature], calls


@pytest.mark.parametrize("signature", ["2.10", "2.12"])
def test_varlen_kernel_call_adapts_to_the_torch_api(signature, monkeypatch):
    fake, calls = _fake_varlen(signature)
    monkeypatch.setattr(P, "_varlen_api", lambda: (fake, frozenset(inspect.signature(fake).parameters)))
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(50, 4, 16, generator=gen)
    k, v = torch.randn(2, 50, 2, 16, generator=gen)  # GQA: 2 kv heads for 4 q heads
    meta = P.build_packed_metadata(torch.tensor([list(range(20)) + list(range(30))]))
    scale = 0.3  # not 1/sqrt(D): the 2.10 path has to fold it into q
    expected = P._varlen_by_example(q, k, v, meta, scale)
    torch.testing.assert_close(P._varlen_flash(q, k, v, meta, scale), expected, rtol=1e-5, atol=1e-5)
    assert calls == [signature]


@pytest.mark.gpu
def test_gpu_varlen_matches_per_example_and_syncs_drop_to_one():
    """Real kernel, real head size (Qwen3: D=128, GQA 40/8 heads cut to 8/2), bf16; sync counts from torch itself."""
    from optkit.measure.syncs import count_device_syncs

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(4096, 8, 128, device=dev, dtype=torch.bfloat16, generator=gen)
    k, v = torch.randn(2, 4096, 2, 128, device=dev, dtype=torch.bfloat16, generator=gen)
    batch = packed_batch(2, 2048, 512, torch.Generator().manual_seed(0), compose(["data=packed"]).data)
    meta = P.build_packed_metadata(batch.tensors["position_ids"].to(dev))
    out = P._varlen_flash(q, k, v, meta, 128**-0.5)
    ref64 = P._varlen_by_example(q.double(), k.double(), v.double(), meta, 128**-0.5)
    same_dtype = P._varlen_by_example(q, k, v, meta, 128**-0.5)
    assert_close_to_reference(out, ref64, same_dtype, torch.bfloat16, name="varlen_attn")

    model = build_model(
        compose(
            [
                "model=qwen3_14b",
                "model.num_layers=2",
                "model.hf_config.hidden_size=1024",
                "model.hf_config.intermediate_size=2048",
            ]
        ).model,
        device=dev,
    ).train()
    tensors = {k: t.to(dev) for k, t in batch.tensors.items()}
    P.install_packed_attention(model)
    per_layer = count_device_syncs(lambda: model(**tensors).loss.backward())
    apply_packed_metadata_cache(model, compose(["opt.packed_metadata_cache=true"]).opt)
    per_batch = count_device_syncs(lambda: model(**tensors).loss.backward())
    assert per_layer >= 3 * 2 and per_batch <= 1, (per_layer, per_batch)


@pytest.mark.gpu
@pytest.mark.parametrize("cache", [False, True], ids=["per_layer", "per_batch"])
def test_gpu_packed_loss_and_grads_equal_the_padded_examples_at_qwen3_14b_widths(cache):
    """Qwen3-14B widths (H=5120, I=17408, 40/8 heads of D=128) cut to 2 layers, bf16, one packed row of 2048 tokens
    through torch's varlen kernel, metadata rebuilt per layer or built once per batch: the loss and every gradient
    against the same examples padded through HF's sdpa in float64, HF's bf16 padded run as the same-dtype bar."""
    dev = torch.device("cuda")
    cfg = compose(
        [
            "model=qwen3_14b",
            "model.num_layers=2",
            "model.hf_config.vocab_size=1024",
            f"opt.packed_metadata_cache={str(cache).lower()}",
            "data=packed",
            "data.seq_len=2048",
            "data.length_dist=uniform",
            "data.min_len=16",
            "data.max_len=512",
        ]
    )
    model = build_model(cfg.model, device=dev).train()
    padded = padded_batch(1, 2048, 1024, torch.Generator().manual_seed(8), cfg.data).to(dev)
    packed = packed_batch(1, 2048, 1024, torch.Generator().manual_seed(8), cfg.data).to(dev)
    ref_loss, ref_grads = _loss_grads(copy.deepcopy(model).double(), **padded.tensors)
    torch_loss, torch_grads = _loss_grads(model, **padded.tensors)
    if cache:
        apply_packed_metadata_cache(model, cfg.opt)
    else:
        P.install_packed_attention(model)
    loss, grads = _loss_grads(model, **packed.tensors)
    stats = P.packing_stats(model)
    assert (stats.varlen_kernel_calls, stats.loop_kernel_calls) == (2, 0), stats
    assert (stats.per_layer_rebuilds, stats.per_batch_builds) == ((0, 1) if cache else (2, 0)), stats
    assert_close_to_reference(loss, ref_loss, torch_loss, torch.bfloat16, name="loss")
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert_close_to_reference(grads[name], ref_grads[name], torch_grads[name], torch.bfloat16, name=name)
