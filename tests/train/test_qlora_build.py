"""QLoRA built one decoder layer at a time (models.build_model_layerwise + qlora.LayerQuantizer): the same
quantized weights as quantizing the built model (packed NF4, absmax, nested statistics: bit for bit), from
random weights and from a local checkpoint; at most one layer in full precision at any time; every buffer
as the plain build makes it."""

import pytest
import torch
from torch import nn

from optkit.bench.setup import build_base_model, build_training
from optkit.config.compose import compose
from optkit.models import build_model, build_model_layerwise, torch_dtype
from optkit.train.method import decoder_layers, quantize_for_qlora
from optkit.train.qlora import LayerQuantizer

pytest.importorskip("bitsandbytes")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2")


def _cfg(model="tiny_llama", *overrides):
    return compose([f"model={model}", "train=qlora", *overrides])


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _nothing(index, layer):
    return None


def _quantized_layerwise(cfg, each_layer=None):
    quantize = LayerQuantizer(cfg.train, torch_dtype(cfg.model.dtype))

    def step(index, layer):
        quantize(index, layer)
        if each_layer:
            each_layer(index, layer)

    model = build_model_layerwise(cfg.model, "cpu", cfg.train.seed, decoder_layers, step)
    return quantize.finish(model), quantize


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layerwise_quantization_equals_quantizing_the_built_model(dtype):
    cfg = _cfg("tiny_llama", f"model.dtype={dtype}")
    built = build_model_layerwise(cfg.model, "cpu", 0, decoder_layers, _nothing)  # same seed, same weights
    old_names = quantize_for_qlora(built, cfg.train)
    new, quantize = _quantized_layerwise(cfg)
    assert quantize.replaced == old_names
    assert any(key.endswith("weight.absmax") for key in new.state_dict())  # the quantization state is compared
    _assert_same_state(new, built)
    assert new.is_loaded_in_4bit


def test_a_local_checkpoint_quantizes_layerwise_to_the_same_weights(tmp_path):
    source = build_model(compose(["model=tiny_llama", "model.dtype=bfloat16"]).model, "cpu", seed=3)
    source.save_pretrained(tmp_path)
    cfg = _cfg("tiny_llama", f"model.path={tmp_path}", "model.dtype=bfloat16")
    old = build_model(cfg.model, "cpu")
    quantize_for_qlora(old, cfg.train)
    new, _ = _quantized_layerwise(cfg)
    _assert_same_state(new, old)


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta")


def test_at_most_one_layer_exists_in_full_precision_while_building():
    """What the device holds each time a layer is handed over: the model outside the layers, the layers
    quantized so far and this one layer in full precision; never the whole full-precision model."""
    cfg = _cfg("tiny_llama", "model.hf_config.num_hidden_layers=6")
    roots, seen = [], []

    def layers_of(model):
        roots.append(model)
        return decoder_layers(model)

    quantize = LayerQuantizer(cfg.train, torch_dtype(cfg.model.dtype))

    def step(index, layer):  # called before quantizing: this layer is in full precision now
        root = roots[0]
        full = [
            i
            for i, each in enumerate(decoder_layers(root))
            if any(type(m) is nn.Linear and m.weight.device.type != "meta" for m in each.modules())
        ]
        seen.append((index, full, _bytes([*root.parameters(), *root.buffers()])))
        quantize(index, layer)

    model = quantize.finish(build_model_layerwise(cfg.model, "cpu", 0, layers_of, step))
    assert [full for _, full, _ in seen] == [[i] for i in range(6)]
    plain = build_model(cfg.model, "cpu")
    full_model = _bytes([*plain.parameters(), *plain.buffers()])
    one_layer = _bytes(decoder_layers(plain)[0].parameters())
    outside = full_model - 6 * one_layer
    quantized_layer = _bytes(decoder_layers(model)[0].parameters())
    for index, _, held in seen:
        assert held <= outside + index * quantized_layer + one_layer, (index, held)
    assert max(held for _, _, held in seen) < 0.6 * full_model


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_build_makes_every_buffer_and_shape_of_the_plain_build(family):
    cfg = compose([f"model=tiny_{family}"])
    plain = build_model(cfg.model, "cpu", seed=0)
    layerwise = build_model_layerwise(cfg.model, "cpu", 0, decoder_layers, _nothing)
    assert dict(plain.named_buffers()).keys() == dict(layerwise.named_buffers()).keys()
    for (name, a), (_, b) in zip(plain.named_buffers(), layerwise.named_buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    shapes = {n: (p.shape, p.dtype) for n, p in plain.named_parameters()}
    assert shapes == {n: (p.shape, p.dtype) for n, p in layerwise.named_parameters()}
    if plain.config.tie_word_embeddings:
        assert layerwise.get_output_embeddings().weight is layerwise.get_input_embeddings().weight
    made = dict(plain.named_parameters())
    for name, param in layerwise.named_parameters():  # initialized as the plain build: constants equal, draws alike
        want = made[name].detach()
        if want.numel() > 1 and want.float().std() > 0:
            ratio = (param.float().std() / want.float().std()).item()
            assert 0.8 < ratio < 1.25 and abs(param.float().mean().item()) < 3 * want.float().std().item(), name
        else:
            torch.testing.assert_close(param.detach(), want, rtol=0, atol=0, msg=name)
    ids = torch.randint(0, plain.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(layerwise(input_ids=ids, use_cache=False).logits).all()


def test_layerwise_weights_follow_the_seed():
    cfg = compose(["model=tiny_llama"])
    a = build_model_layerwise(cfg.model, "cpu", 0, decoder_layers, _nothing)
    b = build_model_layerwise(cfg.model, "cpu", 0, decoder_layers, _nothing)
    c = build_model_layerwise(cfg.model, "cpu", 1, decoder_layers, _nothing)
    _assert_same_state(a, b)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


def test_a_qlora_point_is_built_layerwise_and_trains():
    cfg = _cfg("tiny_llama", "train.batch_size=1", "data.seq_len=16")
    base = build_base_model(cfg, torch.device("cpu"))
    assert base.is_loaded_in_4bit and type(base.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    model, optimizer, batches, _ = build_training(cfg, torch.device("cpu"))
    loss = model(**batches[0].tensors, use_cache=False).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
