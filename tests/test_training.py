import csv
import itertools

import pytest
import torch
from torch import nn

from pipeline.training import fit_head, warmup_cosine, write_history


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    centers = torch.eye(3, 8) * 4
    return centers[labels] + torch.randn(n, 8, generator=generator), labels


def test_fit_head_learns_and_stops_early():
    torch.manual_seed(0)
    head, history = fit_head(
        nn.Linear(8, 3),
        separable(300, 0),
        separable(100, 1),
        lr=0.05,
        weight_decay=0.0,
        batch_size=32,
        max_epochs=200,
        patience=3,
        seed=0,
    )
    features, labels = separable(200, 2)
    accuracy = (head(features).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.95
    assert len(history) < 200
    assert history[-1]["epoch"] == len(history)


def test_fit_head_is_deterministic():
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        head, _ = fit_head(nn.Linear(8, 3), separable(100, 0), separable(50, 1), 0.05, 0.0, 16, 5, 5, seed=0)
        results.append(head.weight.detach().clone())
    assert torch.equal(*results)


def test_warmup_then_cosine_to_zero():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, warmup_steps=10, total_steps=100)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.01)
    assert rates[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert rates[-1] < 0.01


def test_history_is_a_csv_dvc_plots_reads(tmp_path):
    history = [
        {
            "epoch": 1,
            "train_loss": 1.0,
            "train_accuracy": 0.5,
            "val_loss": 1.1,
            "val_accuracy": 0.4,
            "lr": 0.1,
        }
    ]
    write_history(tmp_path / "h.csv", history)
    with open(tmp_path / "h.csv") as file:
        assert next(csv.DictReader(file))["val_accuracy"] == "0.4"


def test_balanced_class_weights_favour_rare_classes():
    from pipeline.training import balanced_class_weights

    weights = balanced_class_weights(torch.tensor([0, 0, 0, 1]), num_classes=3)
    assert weights.tolist() == pytest.approx([4 / 9, 4 / 3, 4 / 3])  # an absent class counts as one
    torch.manual_seed(0)
    features, labels = separable(300, 0)
    keep = (labels != 2) | (torch.arange(300) % 10 == 0)  # class 2 becomes rare
    train = (features[keep], labels[keep])
    head, _ = fit_head(
        nn.Linear(8, 3),
        train,
        separable(60, 1),
        0.05,
        0.0,
        32,
        30,
        30,
        seed=0,
        class_weight=balanced_class_weights(train[1], 3),
    )
    assert head(separable(200, 2)[0]).argmax(1).eq(2).any()
