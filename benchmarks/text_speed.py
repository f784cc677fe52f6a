"""Benchmark: the pipeline's text paths against the plain PyTorch loops tutorials write.

Both sides use the same encoder (sentence-transformers/all-MiniLM-L6-v2 from the text
extra), the same agnews-dev texts, batch size, pooling, optimizer and threads, in one run:

1. Fine-tuning, in texts per second: the plain loop tokenises every text padded to
   ``max_length`` (as ``tokenizer(..., padding="max_length")`` in most tutorials) and
   trains AutoModel plus a linear layer on shuffled batches; the pipeline tokenises once,
   batches texts of about one length together and pads each batch to its longest text
   (pipeline.core.distributed.GlobalBatchSampler, pipeline.modalities.text.models.Tokens),
   through its own training loop (pipeline.core.training.train_epoch).
2. A linear probe over ``--probe-epochs`` epochs: the plain loop runs the frozen encoder
   forward on every batch of every epoch; the pipeline extracts features once (extract)
   and trains the head on them (train_head).

Run from the repository root: ``python -m benchmarks.text_speed [--texts 256]``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks import results
from pipeline.core.common import seed_everything
from pipeline.core.distributed import GlobalBatchSampler, Ranks, ShardSampler
from pipeline.core.loaders import make_loader
from pipeline.core.models import Classifier
from pipeline.core.training import extract_features, fit_head, grad_scaler, train_epoch
from pipeline.modalities import text
from pipeline.modalities.text import models as text_models

ARCH = "sentence-transformers/all-MiniLM-L6-v2"
DATA = Path("../shared/data/agnews-dev/train.csv")


def agnews(count: int, offset: int = 0) -> tuple[list[str], torch.Tensor]:
    with open(DATA, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))[offset : offset + count]
    classes = sorted({row["label"] for row in rows})
    return [row["text"] for row in rows], torch.tensor([classes.index(row["label"]) for row in rows])


def padded_to_max_length(texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """The tutorials' tokenising: transformers' AutoTokenizer, every text padded to max_length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_models.source(ARCH))
    return tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")


def minilm_preprocessing() -> dict:
    """How the pipeline feeds MiniLM with the committed text keys: 128 tokens, the start
    kept, dynamic padding, mean pooling."""
    config = {
        "arch": ARCH,
        "revision": "main",
        "weights": "pretrain",
        "max_length": 128,
        "truncation": "right",
    }
    return text.preprocessing({**config, "padding": "dynamic", "pooling": "mean"})


def encoder(preprocessing: dict) -> text_models.TextEncoder:
    torch.manual_seed(0)
    return text_models.TextEncoder(text_models.pretrained_encoder(ARCH), "mean")


def pipeline_finetune(texts: list[str], labels: torch.Tensor, preprocessing: dict, batch: int) -> float:
    """Seconds for one epoch of the pipeline's fine-tuning, tokenising included."""
    start = time.perf_counter()
    ids, _ = text_models.tokenise(preprocessing, texts)
    tokens = text_models.Tokens(ids, labels, 0, "dynamic", preprocessing["max_length"])
    sampler = GlobalBatchSampler(len(tokens), batch, Ranks(), seed=0, lengths=tokens.lengths)
    loader = make_loader(tokens, batch, torch.device("cpu"), sampler=sampler)
    model = Classifier(encoder(preprocessing), nn.Linear(384, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = torch.device("cpu")
    train_epoch(model, loader, nn.CrossEntropyLoss(), device, optimizer, grad_scaler(device, "off"))
    return time.perf_counter() - start


def plain_finetune(texts: list[str], labels: torch.Tensor, preprocessing: dict, batch: int) -> float:
    """Seconds for one epoch of the tutorials' loop: AutoTokenizer padding every text to
    max_length, AutoModel and a linear layer on mean-pooled states, shuffled batches."""
    start = time.perf_counter()
    encoded = padded_to_max_length(texts, preprocessing["max_length"])
    dataset = torch.utils.data.TensorDataset(encoded["input_ids"], encoded["attention_mask"], labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True)
    model, head = encoder(preprocessing).model, nn.Linear(384, 4)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-4)
    model.train()
    for ids, mask, target in loader:
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        loss = nn.functional.cross_entropy(head(pooled), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def pipeline_probe(texts: list[str], labels: torch.Tensor, preprocessing: dict, epochs: int) -> float:
    """Seconds for extract-once and a head trained on the cached features."""
    start = time.perf_counter()
    ids, _ = text_models.tokenise(preprocessing, texts)
    tokens = text_models.Tokens(ids, labels, 0, "dynamic", preprocessing["max_length"])

    loader = make_loader(
        tokens, 256, torch.device("cpu"), sampler=ShardSampler(len(tokens), Ranks(), tokens.lengths)
    )
    features = extract_features(encoder(preprocessing), loader, torch.device("cpu"), "off")
    half = len(texts) // 2
    train, val = (features[0][:half], features[1][:half]), (features[0][half:], features[1][half:])
    fit_head(nn.Linear(384, 4), train, val, 1e-3, 1e-4, 64, epochs, epochs, seed=0)
    return time.perf_counter() - start


def plain_probe(texts: list[str], labels: torch.Tensor, preprocessing: dict, epochs: int) -> float:
    """Seconds for the textbook probe: the frozen encoder forward inside every step."""
    start = time.perf_counter()
    half = len(texts) // 2
    encoded = padded_to_max_length(texts, preprocessing["max_length"])
    model, head = encoder(preprocessing).eval(), nn.Linear(384, 4)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    batches = torch.stack([encoded["input_ids"], encoded["attention_mask"]], 1)
    train = torch.utils.data.TensorDataset(batches[:half], labels[:half])
    for _ in range(epochs):
        for inputs, target in torch.utils.data.DataLoader(train, batch_size=64, shuffle=True):
            with torch.no_grad():
                features = model(inputs)
            loss = nn.functional.cross_entropy(head(features), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            for start_at in range(half, len(texts), 256):
                head(model(batches[start_at : start_at + 256]))
    return time.perf_counter() - start


NAME = "text_speed"


def table(record: dict) -> str:
    """Fine-tuning's texts a second and the probe's seconds, both ways, from the results file."""
    r = record["results"]
    train = r["probe_texts"] // 2
    return "\n".join(
        [
            "| task | plain PyTorch loop | pipeline | speed-up |",
            "|---|---:|---:|---:|",
            f"| fine-tuning, one epoch of {r['finetune_texts']} texts, batch {r['batch_size']} "
            f"(texts/s, tokenising included) | {r['finetune_texts'] / r['finetune_plain_seconds']:.1f} "
            f"| {r['finetune_texts'] / r['finetune_pipeline_seconds']:.1f} "
            f"| {r['finetune_plain_seconds'] / r['finetune_pipeline_seconds']:.2f}x |",
            f"| linear probe, {r['probe_epochs']} epochs on {train} texts (+ {r['probe_texts'] - train} val) "
            f"(s) | {r['probe_plain_seconds']:.1f} | {r['probe_pipeline_seconds']:.1f} "
            f"| {r['probe_plain_seconds'] / r['probe_pipeline_seconds']:.1f}x |",
            f"| tokenising the 2,000 agnews-dev training texts once (s) | | "
            f"{r['tokenising_2000_seconds']:.2f} | |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=256, help="training texts for the fine-tuning epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--probe-texts", type=int, default=400, help="texts for the probe (half train, half val)"
    )
    parser.add_argument("--probe-epochs", type=int, default=10)
    args = parser.parse_args()
    seed_everything(0)
    preprocessing = minilm_preprocessing()
    texts, labels = agnews(args.texts)
    start = time.perf_counter()
    text_models.tokenise(preprocessing, agnews(2000)[0])
    tokenising = time.perf_counter() - start
    ours = pipeline_finetune(texts, labels, preprocessing, args.batch_size)
    plain = plain_finetune(texts, labels, preprocessing, args.batch_size)
    probe_texts, probe_labels = agnews(args.probe_texts, offset=args.texts)
    cached = pipeline_probe(probe_texts, probe_labels, preprocessing, args.probe_epochs)
    every_epoch = plain_probe(probe_texts, probe_labels, preprocessing, args.probe_epochs)
    measured = {
        "threads": torch.get_num_threads(),
        "tokenising_2000_seconds": round(tokenising, 3),
        "finetune_texts": args.texts,
        "batch_size": args.batch_size,
        "finetune_plain_seconds": round(plain, 2),
        "finetune_pipeline_seconds": round(ours, 2),
        "probe_texts": args.probe_texts,
        "probe_epochs": args.probe_epochs,
        "probe_plain_seconds": round(every_epoch, 2),
        "probe_pipeline_seconds": round(cached, 2),
    }
    print(table(results.save(NAME, "python -m benchmarks.text_speed", measured)))


if __name__ == "__main__":
    main()
