"""Checkpointing modes give the gradients of no checkpointing (CPU: exact recomputation; gpu-marked at 8B shapes),
keep fewer activations for backward than no checkpointing (CPU: bytes autograd saves, counted), and on a GPU
the double-buffered mode hides most of its reload copies behind compute.

On CPU the recomputation runs the same float32 kernels on the same inputs, so gradients agree to
rounding of the accumulation order (bound: 1e-6 of each tensor's largest entry). Every check takes
the second of two steps with different batches, so a stale buffer from the previous step would show.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from optkit.opt.fused_lora import apply_fused_lora
from optkit.train.checkpointing import OffloadedLayerForward, disable_checkpointing, enable_checkpointing
from optkit.train.method import decoder_layers
from tests.train._reload_check import reload_mismatches
from tests.train._tiny import BATCH, SEQ_LEN, loss_and_grads, max_relative_error, one_thread, tiny_model, token_batch  # noqa: F401

MODES = ("standard", "offload", "offload_double_buffer")
RTOL = 1e-6
BF16_RECOMPUTE_FLOOR = 1e-2  # 2.5 bf16 epsilons of a tensor's largest gradient (the race it guards against: 1e4)


def _second_step_grads(net, mode, seed=0):
    info = enable_checkpointing(net, mode)
    try:
        loss_and_grads(net, token_batch(seed + 100))
        torch.manual_seed(seed)
        loss, grads = loss_and_grads(net, token_batch(seed))
    finally:
        disable_checkpointing(net)
    return loss, grads, info


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen3"])
def test_gradients_equal_no_checkpointing(model, method):
    net, _ = tiny_model(model, method)
    torch.manual_seed(0)
    ref_loss, ref_grads = loss_and_grads(net, token_batch(0))
    for mode in MODES:
        loss, grads, _ = _second_step_grads(net, mode)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6, msg=f"{mode}: loss")
        assert max_relative_error(grads, ref_grads) < RTOL, mode


def _saved_activation_bytes(net, ids, mode: str):
    """(bytes of every activation autograd saves for backward during one forward, those saved outside the
    decoder layers). Counted with saved_tensors_hooks, once per storage; parameters are not activations."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved, outside, inside = {}, {}, [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
            if not inside[0]:
                outside[storage.data_ptr()] = storage.nbytes()
        return tensor

    def enter(*_):
        inside[0] += 1

    def leave(*_):
        inside[0] -= 1

    hooks = [
        h
        for layer in decoder_layers(net)
        for h in (layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave))
    ]
    enable_checkpointing(net, mode)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = net(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    finally:
        disable_checkpointing(net)
        for hook in hooks:
            hook.remove()
    return sum(saved.values()), sum(outside.values())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_keeps_only_layer_inputs(method):
    """No checkpointing saves every layer's activations; standard keeps at most one input per layer beside
    what is saved outside the layers (embedding, head, loss), the offload modes not even that (it goes to
    host memory outside autograd)."""
    layers = 4
    net, cfg = tiny_model("tiny_llama", method, f"model.num_layers={layers}")
    ids = token_batch(0)
    layer_input_bytes = BATCH * SEQ_LEN * cfg.model.hf_config.hidden_size * 4  # float32
    without, outside = _saved_activation_bytes(net, ids, "none")
    assert without - outside >= layers * 4 * layer_input_bytes, "the count misses the layers' activations"
    bounds = {"standard": outside + layers * layer_input_bytes, "offload": outside, "offload_double_buffer": outside}
    for mode in MODES:
        saved, _ = _saved_activation_bytes(net, ids, mode)
        assert saved <= bounds[mode], f"{mode}: {saved} bytes saved, no checkpointing {without}, bound {bounds[mode]}"


def test_double_buffer_reports_its_buffers_and_prefetches():
    net, cfg = tiny_model("tiny_llama", "lora", "model.num_layers=3")
    _, _, info = _second_step_grads(net, "offload_double_buffer")
    layer_input_bytes = BATCH * SEQ_LEN * cfg.model.hf_config.hidden_size * 4  # float32
    assert info["checkpointing"] == "offload_double_buffer"
    assert info["offload_device_buffer_bytes"] == 2 * layer_input_bytes
    assert info["offload_pinned_host_bytes"] == 3 * layer_input_bytes
    # per step the last layer's input loads on demand; the two before it were prefetched
    assert (info["offload_blocking_reloads"], info["offload_prefetch_hits"]) == (2, 4)
    _, _, plain = _second_step_grads(net, "offload")
    assert plain["offload_device_buffer_bytes"] == 0 and plain["offload_blocking_reloads"] == 6


def test_dropout_masks_are_replayed_in_the_recomputation():
    net, _ = tiny_model("tiny_llama", "lora", "train.lora_dropout=0.3")
    torch.manual_seed(0)
    ref_loss, ref_grads = loss_and_grads(net, token_batch(0))
    torch.manual_seed(1)
    assert max_relative_error(loss_and_grads(net, token_batch(0))[1], ref_grads) > 1e-3  # dropout is live
    for mode in ("offload", "offload_double_buffer"):
        _, grads, _ = _second_step_grads(net, mode)
        assert max_relative_error(grads, ref_grads) < RTOL, mode


@pytest.mark.parametrize("mode", ["standard", "offload_double_buffer"])
def test_composes_with_fused_qlora(mode):
    net, _ = tiny_model("tiny_qwen3", "qlora")
    apply_fused_lora(net, OmegaConf.create({"fused_lora": True}))
    torch.manual_seed(0)
    _, ref_grads = loss_and_grads(net, token_batch(0))
    _, grads, _ = _second_step_grads(net, mode)
    assert max_relative_error(grads, ref_grads) < RTOL


def test_cache_requests_are_dropped_and_disable_restores():
    net, _ = tiny_model("tiny_llama", "lora")
    ids = token_batch(0)
    _, ref_grads = loss_and_grads(net, ids)
    enable_checkpointing(net, "offload")
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_checkpointing(net, "offload_double_buffer")
    net.zero_grad(set_to_none=True)
    net(input_ids=ids, labels=ids, use_cache=True).loss.backward()  # a cache would be filled twice
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    assert max_relative_error(grads, ref_grads) < RTOL
    with torch.no_grad():  # eval-style calls bypass the offloader
        net(input_ids=ids)
    disable_checkpointing(net)
    assert not any(isinstance(m.__dict__.get("forward"), OffloadedLayerForward) for m in net.modules())


def test_unknown_mode_lists_the_choices():
    net, _ = tiny_model("tiny_llama", "full", "model.num_layers=1")
    with pytest.raises(ValueError, match="offload_double_buffer"):
        enable_checkpointing(net, "offload_tripple")


def _llama3_8b_4_layers_gpu(method):
    net, _ = tiny_model("llama3_8b", method, "model.num_layers=4", "model.dtype=bfloat16", device="cuda")
    return net, torch.randint(0, 128256, (2, 2048), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_gradients_equal_no_checkpointing_llama3_8b_gpu(method):
    """Llama-3-8B shapes cut to 4 layers, bf16, 2 x 2048 tokens. GPU recomputation is not bitwise equal:
    on the H100 some steps of no checkpointing, of HF's checkpointing and of the offload modes alike
    differ from a reference step by up to 0.6% of a tensor's largest gradient, sporadically (attention
    backward is not deterministic; results/h100/gpu-tests/ckpt-diag-*.log), so one sampled rerun can
    read 0 noise. Bound: 2x the larger of the sampled noise and HF checkpointing's gap, and at least
    BF16_RECOMPUTE_FLOOR. The exact checks are test_offload_reloads_exactly_the_forward_inputs_gpu
    (bitwise reloads) and, on CPU, test_forward_runs_in_grad_mode_as_without_checkpointing."""
    net, ids = _llama3_8b_4_layers_gpu(method)
    _, ref_grads = loss_and_grads(net, ids)
    noise = max_relative_error(loss_and_grads(net, ids)[1], ref_grads)
    errors = {}
    for mode in MODES:
        info = enable_checkpointing(net, mode)
        try:  # the first step after enabling counts too: freshly allocated reload buffers once raced there
            errors[mode] = max(max_relative_error(loss_and_grads(net, ids)[1], ref_grads) for _ in range(2))
        finally:
            disable_checkpointing(net)
        if mode == "offload_double_buffer":
            assert (
                info["offload_prefetch_hits"] == 2 * 3
                and info["offload_device_buffer_bytes"] == 2 * 2 * 2048 * 4096 * 2
            )
    bound = max(2 * max(noise, errors["standard"]), BF16_RECOMPUTE_FLOOR)
    assert errors["offload"] <= bound and errors["offload_double_buffer"] <= bound, (noise, errors)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("mode", ["offload", "offload_double_buffer"])
def test_offload_reloads_exactly_the_forward_inputs_gpu(mode, method):
    """Bitwise: the tensor each layer recomputes from equals the input it saw in forward, on the first
    steps after enabling (where fresh reload buffers once raced with queued compute) and later ones."""
    net, ids = _llama3_8b_4_layers_gpu(method)
    enable_checkpointing(net, mode)
    try:
        with reload_mismatches() as mismatches:
            for _ in range(3):
                loss_and_grads(net, ids)
    finally:
        disable_checkpointing(net)
    assert not mismatches, (
        f"{mode}: reloaded layer inputs differ from the forward inputs (layer, max abs diff): {mismatches}"
    )


@pytest.mark.gpu
def test_double_buffer_hides_most_reload_time_behind_compute_gpu(tmp_path):
    """While layer i recomputes, offload_double_buffer copies layer i-1's input back on the copy stream: in
    one profiled step (Llama-3-8B shapes cut to 4 layers, lora, bf16, 2 x 2048 tokens) a compute kernel
    runs beside more than half of the host->device copy time. Read as a profiled point reads it
    (optkit.measure.profile: the step's memcpy and kernel intervals)."""
    from optkit.measure.profile import profile_step

    net, ids = _llama3_8b_4_layers_gpu("lora")
    enable_checkpointing(net, "offload_double_buffer")

    def step():
        net.zero_grad(set_to_none=True)
        net(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        torch.cuda.synchronize()

    try:
        step()  # the first step allocates the reload buffers and pinned host copies
        fields = profile_step(step, torch.device("cuda"), tmp_path / "offload_double_buffer.json.gz")
    finally:
        disable_checkpointing(net)
    assert fields["profile_dtoh_busy_ms"] and fields["profile_htod_busy_ms"], fields
    assert fields["profile_htod_overlap_fraction"] > 0.5, fields


def test_second_forward_before_backward_is_refused_but_a_dropped_graph_is_not():
    net, _ = tiny_model("tiny_llama", "lora", "model.num_layers=1")
    ids = token_batch(0)
    enable_checkpointing(net, "offload_double_buffer")
    try:
        kept = net(input_ids=ids, labels=ids).loss
        with pytest.raises(RuntimeError, match="before the backward"):
            net(input_ids=ids, labels=ids)  # would overwrite the host copy `kept` still needs
        del kept  # a graph dropped without backward releases its layer inputs
        net(input_ids=ids, labels=ids).loss.backward()
    finally:
        disable_checkpointing(net)


def test_forward_runs_in_grad_mode_as_without_checkpointing(monkeypatch):
    """GPU SDPA picks its kernel by whether q/k/v require grad. A layer run under no_grad in forward would
    feed the next layers other activations than the recomputation sees (H100: 0.5% gradient error);
    here SDPA is made grad-mode sensitive on purpose, and the offload modes must still match."""
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def grad_mode_sensitive_sdpa(query, key, value, *args, **kwargs):
        out = real_sdpa(query, key, value, *args, **kwargs)
        return out if query.requires_grad else out * 1.01

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", grad_mode_sensitive_sdpa)
    net, _ = tiny_model("tiny_llama", "lora")
    _, ref_grads = loss_and_grads(net, token_batch(0))
    for mode in ("offload", "offload_double_buffer"):
        _, grads, _ = _second_step_grads(net, mode)
        assert max_relative_error(grads, ref_grads) < RTOL, mode


def test_offload_under_torch_compile():
    """The offload machinery is opaque to Dynamo; the layers it runs are compiled frames, grads unchanged."""
    net, _ = tiny_model("tiny_llama", "lora")
    ids = token_batch(0)
    _, ref_grads = loss_and_grads(net, ids)
    info = enable_checkpointing(net, "offload_double_buffer")
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager")
    try:
        for _ in range(2):  # the second step reuses the buffers and host copies of the first
            net.zero_grad(set_to_none=True)
            compiled(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    finally:
        disable_checkpointing(net)
        torch._dynamo.reset()
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    assert max_relative_error(grads, ref_grads) < RTOL
    assert info["offload_prefetch_hits"] == 2
