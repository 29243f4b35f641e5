"""A tiny HF Trainer run shared by the resume tests: six steps of a fixed batch, a checkpoint every
three steps (transformers is imported by the caller's test, after its importorskip)."""
import torch


def tiny_trainer(model, optimizer, out):
    """A Trainer over eight identical rows (the sampler's shuffle changes nothing), linear schedule."""
    from transformers import Trainer, TrainingArguments

    row = torch.randint(1, 32, (12,), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": row, "labels": row}] * 8
    args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=8,
                             learning_rate=3e-2, lr_scheduler_type="linear", logging_steps=1,
                             save_strategy="steps", save_steps=3, report_to="none", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
