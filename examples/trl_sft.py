"""Supervised fine-tuning with TRL's SFTTrainer (its default SFTConfig: bf16, gradient checkpointing) and LoRA,
made faster and leaner by one call: ``optkit.patch(model, "full")``.

    python examples/trl_sft.py                           # CPU: a tiny Llama, well under a minute
    python examples/trl_sft.py --model llama3_8b         # GPU: the Llama-3-8B shape (random weights), bf16
    python examples/trl_sft.py --model /path/to/ckpt     # your checkpoint and its tokenizer
    python examples/trl_sft.py --opt off                 # the same run without optkit, to compare
    python examples/trl_sft.py --packing                 # pack rows into max_length (padding-free)

Under SFTTrainer the loss comes from TRL's own fused LM head (it also returns the per-token entropy and
accuracy TRL logs); optkit's kernels and fused LoRA run, and optkit's log says so in one line.
Each run prints one JSON line (tokens/s after warm-up, peak GPU memory, the losses, what optkit changed),
also appended to $OUT/trl_sft.jsonl when $OUT is set.
"""

import argparse

# example_utils first: on a machine without a GPU it switches Triton's interpreter on before transformers loads
from example_utils import ON_GPU, RunMeter, add_common_args, load_model, lora_config, text_dataset
from peft import get_peft_model
from trl import SFTConfig, SFTTrainer

import optkit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--packing", action="store_true", help="SFTConfig(packing=True): rows packed, padding-free")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model, seed=args.seed)
    model = get_peft_model(model, lora_config())
    if args.opt != "off":
        model = optkit.patch(model, args.opt)  # kernels, fused LoRA, LM head + loss without the logits
        print("\n".join(optkit.patch_log(model)))

    meter = RunMeter(args.warmup_steps)
    config = SFTConfig(  # TRL's defaults otherwise: bf16=True, gradient_checkpointing=True
        output_dir="/tmp/optkit-example-trl-sft",
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        max_length=args.max_length,
        packing=args.packing,
        learning_rate=2e-4 if ON_GPU else 2e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        include_num_input_tokens_seen="non_padding",
        seed=args.seed,
        use_cpu=not ON_GPU,  # TRL's bf16 default asks for it on a machine without a GPU (CPU autocast)
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=text_dataset(args.steps * args.batch_size, n_chars=args.max_length, seed=args.seed),
        processing_class=tokenizer,
        callbacks=[meter],
    )
    trainer.train()
    return meter.report("trl_sft", args, model)


if __name__ == "__main__":
    main()
