"""Independent cross-check of optkit's harness: plain HF + peft, no optkit code, wall clock.

Builds the same model shape with random weights, LoRA on the same projections, AdamW, and times
`steps` training steps with torch.cuda.synchronize() + time.perf_counter() around the whole window.
optkit's tokens/s on the same point should agree within 5%. Prints one JSON line.

  python scripts/bare_loop.py --model llama3_8b --batch 2 --seq 2048 --steps 20 --warmup 5 [--checkpointing]
"""

import argparse
import json
import time

import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3_8b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args()

    spec = yaml.safe_load(open(f"conf/model/{args.model}.yaml"))
    config = AutoConfig.for_model(spec["family"], **spec["hf_config"])
    config._attn_implementation = spec.get("attn_implementation", "sdpa")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config)
    torch.set_default_dtype(torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g).cuda() for _ in range(4)]
    model.train()

    def step(i):
        ids = batches[i % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tokens = args.batch * args.seq * args.steps
    print(
        json.dumps(
            {
                "bare_loop": True,
                "model": args.model,
                "batch": args.batch,
                "seq": args.seq,
                "checkpointing": args.checkpointing,
                "steps": args.steps,
                "mean_step_ms": 1e3 * elapsed / args.steps,
                "tokens_per_s": tokens / elapsed,
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            }
        )
    )


if __name__ == "__main__":
    main()
