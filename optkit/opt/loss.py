"""Loss swaps: HF's causal-LM loss on optkit's Triton cross-entropy (logits materialized), or the
whole CausalLM forward with the loss fused into the LM head (logits never materialized in training).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import types
from typing import Callable, List

import torch
from torch import nn

from optkit.config.schema import OptConfig
from optkit.opt.edits import add_forward_pre_hook, hf_model_of, is_moe, logger, note_once, override_attr


def shifted_targets(labels: torch.Tensor, ignore_index: int = -100, shift_labels=None) -> torch.Tensor:
    """HF ForCausalLMLoss's targets: labels padded with ignore_index and shifted left, flattened."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _normalize(loss_sum_or_mean: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return loss_sum_or_mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum_or_mean.device)
    return loss_sum_or_mean / num_items_in_batch


def _causal_lm_loss(cross_entropy: Callable) -> Callable:
    """HF's ForCausalLMLoss (same arguments, same mean over non-ignored tokens) on optkit's kernel."""

    def loss_function(
        logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs
    ):
        targets = shifted_targets(labels, ignore_index, shift_labels).to(logits.device)
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = cross_entropy(logits.reshape(-1, vocab_size), targets, ignore_index=ignore_index, reduction=reduction)
        return _normalize(loss.float(), num_items_in_batch)

    return loss_function


def apply_cross_entropy(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    from optkit.kernels.cross_entropy import cross_entropy

    hf = hf_model_of(model)
    if not hasattr(type(hf), "loss_function"):
        return [f"cross_entropy: skipped ({type(hf).__name__} has no loss_function to replace)"]
    # HF's loss_function property returns the instance's _loss_function when set (5.17 and 5.24).
    override_attr(model, hf, "_loss_function", _causal_lm_loss(cross_entropy), by="cross_entropy")
    return ["cross_entropy: loss_function -> optkit cross_entropy on materialized logits"]


def _positional_names(forward: Callable) -> List[str]:
    params = list(inspect.signature(forward).parameters.values())[1:]  # without self
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _fused_loss_forward(hf: nn.Module, note: Callable[[str], None]) -> Callable:
    """``hf``'s CausalLM forward with the training loss fused into the LM head, as a bound method.

    With labels (and ``return_logits`` not True; None means "only in eval mode"), the loss comes from
    ``fused_linear_cross_entropy`` on the final hidden states and logits is None; otherwise the forward
    that was there before (HF's own, unchanged) runs. It carries the original's signature
    (``functools.wraps``): HF's Trainer keeps only the dataset columns that signature names
    (``remove_unused_columns``) and passes ``num_items_in_batch`` because it takes ``**kwargs``.
    """
    cls_forward = type(hf).forward
    positional = _positional_names(cls_forward)

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        # looked up on self, not closed over: a deepcopy of the model calls its own modules
        before = self.__dict__.get("_optkit_forward_before_fused_loss")  # another tool's instance forward
        fallback = before if before is not None else types.MethodType(cls_forward, self)
        if len(args) > len(positional):
            raise TypeError(f"{type(self).__name__}.forward takes at most {len(positional)} positional arguments")
        for name, value in zip(positional, args):  # model(input_ids, attention_mask, ...) as HF allows
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}.forward got multiple values for argument {name!r}")
            kwargs[name] = value
        labels, return_logits = kwargs.pop("labels", None), kwargs.pop("return_logits", None)
        if kwargs.get("fused_lm_head"):  # the caller's own fused head (TRL) computes the loss
            note(_TRL_HEAD_NOTE)
            return fallback(labels=labels, **kwargs)
        wants_logits = (not self.training) if return_logits is None else return_logits
        if labels is None or wants_logits or kwargs.get("logits_to_keep", 0) not in (0, None):
            return fallback(labels=labels, **kwargs)
        return _fused_loss(self, labels, kwargs)

    return types.MethodType(forward, hf)


_TRL_HEAD_NOTE = (
    "not used for calls with fused_lm_head=True (TRL's SFTTrainer): TRL's own fused LM head computes that "
    "loss (it does not materialize the logits either, and also returns the per-token log-probs, entropy and "
    "accuracy TRL logs); optkit's other optimizations run"
)


def _fused_loss(self, labels, kwargs):
    from optkit.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    output_router_logits = kwargs.pop("output_router_logits", None)
    if is_moe(self) and output_router_logits is None:
        output_router_logits = getattr(self.config, "output_router_logits", False)
    return_dict = kwargs.pop("return_dict", None)
    body_kwargs = {k: v for k, v in kwargs.items() if k != "logits_to_keep"}
    if output_router_logits:
        body_kwargs["output_router_logits"] = True
    outputs = getattr(self, self.base_model_prefix)(**body_kwargs)  # HF passes its kwargs to the body too

    hidden = outputs.last_hidden_state
    ignore_index = kwargs.get("ignore_index", -100)
    targets = shifted_targets(labels, ignore_index, kwargs.get("shift_labels")).to(hidden.device)
    num_items = kwargs.get("num_items_in_batch")
    loss = fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        self.lm_head.weight,
        targets,
        bias=self.lm_head.bias,
        ignore_index=ignore_index,
        reduction="sum" if num_items is not None else "mean",
        softcap=getattr(self.config, "final_logit_softcapping", None),
    )
    loss = _normalize(loss.float(), num_items)
    return _causal_lm_output(self, outputs, loss, output_router_logits, kwargs.get("attention_mask"), return_dict)


def _causal_lm_output(hf, outputs, loss, output_router_logits, attention_mask, return_dict):
    from transformers import modeling_outputs

    moe = is_moe(hf)
    fields = {"loss": loss, "logits": None}
    if moe and output_router_logits:  # HF's MoE auxiliary load-balancing loss, as its own forward adds it
        balancing_loss = sys.modules[type(hf).__module__].load_balancing_loss_func
        aux = balancing_loss(outputs.router_logits, hf.num_experts, hf.num_experts_per_tok, attention_mask)
        fields["aux_loss"] = aux
        fields["loss"] = loss + hf.router_aux_loss_coef * aux.to(loss.device)
    output_cls = modeling_outputs.MoeCausalLMOutputWithPast if moe else modeling_outputs.CausalLMOutputWithPast
    for name in output_cls.__dataclass_fields__:  # cache / past_key_values, hidden_states, ... (version-safe)
        if name not in fields and name in outputs.__dataclass_fields__:
            fields[name] = getattr(outputs, name)
    result = output_cls(**fields)
    return result.to_tuple() if return_dict is False else result


def apply_fused_linear_cross_entropy(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    importlib.import_module("optkit.kernels.fused_linear_cross_entropy")  # fail now, not at the first step
    hf = hf_model_of(model)
    lm_head = getattr(hf, "lm_head", None)
    if type(lm_head) is not nn.Linear:  # peft-wrapped or quantized heads have no plain weight to fuse
        kind = type(lm_head).__name__ if lm_head is not None else "no lm_head"
        line = f"fused_linear_cross_entropy: skipped (lm_head is {kind}, not a plain nn.Linear)"
        if hasattr(lm_head, "lora_A"):  # a user's choice that costs the fused loss: say which switch it is
            line = line[:-1] + "; leave lm_head out of LoraConfig(target_modules) to fuse the loss)"
            logger.warning("optkit: %s", line)
        return [line]
    note = note_once(model, "fused_linear_cross_entropy")
    forward = _fused_loss_forward(hf, note)
    previous = hf.__dict__.get("forward")
    if previous is not None:  # someone (accelerate hooks, TRL) replaced it on the instance first
        override_attr(model, hf, "_optkit_forward_before_fused_loss", previous, by="fused_linear_cross_entropy")
    override_attr(model, hf, "forward", forward, by="fused_linear_cross_entropy")

    # A trainer that installs its own forward later (TRL's SFTTrainer wraps this one and calls it with
    # fused_lm_head=True) bypasses the fused loss without calling it: say so at its first such call.
    def notice_foreign_head(module, args, kwargs):
        if kwargs.get("fused_lm_head"):
            note(_TRL_HEAD_NOTE)

    add_forward_pre_hook(model, hf, notice_foreign_head)
    softcap = getattr(hf.config, "final_logit_softcapping", None)
    return [
        f"fused_linear_cross_entropy: {type(hf).__name__}.forward fuses lm_head + loss when labels are given"
        + (f" (final_logit_softcapping={softcap})" if softcap else "")
    ]
