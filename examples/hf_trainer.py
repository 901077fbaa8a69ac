"""LoRA fine-tuning with HF's Trainer, made faster and leaner by one call: ``optkit.patch(model, "full")``.

    python examples/hf_trainer.py                        # CPU: a tiny Llama, well under a minute
    python examples/hf_trainer.py --model llama3_8b      # GPU: the Llama-3-8B shape (random weights), bf16
    python examples/hf_trainer.py --model /path/to/ckpt  # your checkpoint and its tokenizer
    python examples/hf_trainer.py --opt off              # the same run without optkit, to compare

Each run prints one JSON line (tokens/s after warm-up, peak GPU memory, the losses, what optkit changed),
also appended to $OUT/hf_trainer.jsonl when $OUT is set.
"""

import argparse

# example_utils first: on a machine without a GPU it switches Triton's interpreter on before transformers loads
from example_utils import ON_GPU, RunMeter, add_common_args, load_model, lora_config, text_dataset
from peft import get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import optkit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model, seed=args.seed)
    model = get_peft_model(model, lora_config())
    if args.opt != "off":
        model = optkit.patch(model, args.opt)  # kernels, fused LoRA, LM head + loss without the logits
        print("\n".join(optkit.patch_log(model)))

    rows = args.steps * args.batch_size
    texts = text_dataset(rows, n_chars=args.max_length, seed=args.seed)
    dataset = texts.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=["text"],
    )
    meter = RunMeter(args.warmup_steps)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir="/tmp/optkit-example-hf-trainer",
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=2e-4 if ON_GPU else 2e-3,
            bf16=ON_GPU,  # autocast over the bf16 weights, as most GPU scripts do
            gradient_checkpointing=ON_GPU,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            include_num_input_tokens_seen="non_padding",
            seed=args.seed,
        ),
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[meter],
    )
    trainer.train()
    return meter.report("hf_trainer", args, model)


if __name__ == "__main__":
    main()
