import itertools
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.core.epoch_log import EpochLog, read_epoch_log
from pipeline.core.optim import warmup_cosine
from pipeline.core.training import evaluate_epoch, fit_head, grad_scaler, train_epoch


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    centers = torch.eye(3, 8) * 4
    return centers[labels] + torch.randn(n, 8, generator=generator), labels


def test_fit_head_learns_and_stops_early():
    from pipeline.core.selection import lowest_val_loss

    torch.manual_seed(0)
    head, fitted = fit_head(
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
    history = fitted.history
    assert len(history) < 200
    assert history[-1]["epoch"] == len(history)
    assert fitted.kept is lowest_val_loss(history)
    assert fitted.kept["epoch"] == len(history) - 3  # patience: 3 epochs passed over, then it stopped


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


def test_epoch_log_is_dvclive_metrics_and_tsv_plots_read_back_by_the_report(tmp_path):
    log = EpochLog(tmp_path / "live", "finetune")
    for epoch, (val_loss, val_accuracy) in enumerate([(1.0, 0.5), (0.8, 0.7), (0.9, 0.6)], start=1):
        log(
            {
                "epoch": epoch,
                "train_loss": 1.0 / epoch,
                "train_accuracy": 0.5,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "lr_head": 0.1 / epoch,
            }
        )
    log.close({"epoch": 2, "val_loss": 0.8, "val_accuracy": 0.7})
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["step"] == 3
    assert summary["finetune"]["val_accuracy"] == 0.6  # the latest epoch
    assert summary["finetune"]["best_epoch"] == 2 and summary["finetune"]["best_val_accuracy"] == 0.7
    history = read_epoch_log(tmp_path / "live", "finetune")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["val_loss"].tolist() == [1.0, 0.8, 0.9]
    assert history["lr_head"].tolist() == pytest.approx([0.1, 0.05, 0.1 / 3])
    assert not (tmp_path / "dvc.yaml").exists() and not (tmp_path / "live" / "dvc.yaml").exists()


def loader(n: int = 40, batch_size: int = 8) -> DataLoader:
    features, labels = separable(n, 0)
    return DataLoader(TensorDataset(features, labels), batch_size=batch_size)


def test_train_epoch_reports_the_rate_the_scheduler_used_in_the_last_step():
    model = nn.Linear(8, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = warmup_cosine(optimizer, warmup_steps=10, total_steps=100)
    device = torch.device("cpu")
    train = train_epoch(
        model, loader(), nn.CrossEntropyLoss(), device, optimizer, grad_scaler(device, "off"), scheduler
    )
    # 5 batches: steps 0..4 of the warmup from 1% to 100% over 10 steps; the last used step 4.
    assert train["lr"] == [pytest.approx(0.01 + 0.99 * 4 / 10)]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 + 0.99 * 5 / 10)


def test_a_step_the_scaler_skips_leaves_the_schedule_where_it_was():
    model = nn.Linear(8, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = warmup_cosine(optimizer, warmup_steps=10, total_steps=100)
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # what float16 on CUDA uses

    def infinite_loss(logits, targets):
        return logits.sum() * float("inf")

    before = [p.detach().clone() for p in model.parameters()]
    train_epoch(model, loader(), infinite_loss, torch.device("cpu"), optimizer, scaler, scheduler)
    assert scheduler.last_epoch == 0  # five skipped steps, no schedule step
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_evaluate_epoch_neither_trains_nor_keeps_gradients():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    first = evaluate_epoch(model, loader(), nn.CrossEntropyLoss(), torch.device("cpu"))
    second = evaluate_epoch(model, loader(), nn.CrossEntropyLoss(), torch.device("cpu"))
    assert first == second  # eval mode: dropout off, same answer twice
    assert all(p.grad is None for p in model.parameters())
    assert first["loss"] > 0


def test_balanced_class_weights_favour_rare_classes():
    from pipeline.core.optim import balanced_class_weights

    weights = balanced_class_weights(torch.tensor([0, 0, 0, 1]), num_classes=3)
    assert weights.tolist() == pytest.approx([4 / 9, 4 / 3, 4 / 3])  # an absent class counts as one

    def overlapping(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 3, (n,), generator=generator)
        return torch.eye(3, 8)[labels] * 1.5 + torch.randn(n, 8, generator=generator), labels

    features, labels = overlapping(600, 0)
    keep = (labels != 2) | (torch.arange(600) % 10 == 0)  # class 2 a tenth as frequent
    train, (test_features, test_labels) = (features[keep], labels[keep]), overlapping(600, 2)
    recall = {}
    for weighted in (False, True):
        torch.manual_seed(0)
        head, _ = fit_head(
            nn.Linear(8, 3),
            train,
            overlapping(60, 1),
            0.05,
            0.0,
            32,
            30,
            30,
            seed=0,
            class_weight=balanced_class_weights(train[1], 3) if weighted else None,
        )
        predicted = head(test_features).argmax(1)
        recall[weighted] = (predicted[test_labels == 2] == 2).float().mean().item()
    assert recall[True] > recall[False] + 0.2, recall  # the weights are what finds the rare class


def fit_on(history_rule, patience=None, epochs=6):
    """fit() on separable data with a val set, under a selection rule."""
    from pipeline.core.training import fit

    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return model, fit(
        model,
        loader(),
        loader(24),
        nn.CrossEntropyLoss(),
        optimizer,
        epochs,
        torch.device("cpu"),
        select=history_rule,
        patience=patience,
    )


def test_fit_keeps_the_weights_of_the_epoch_the_rule_selects():
    from pipeline.core.selection import best_val_accuracy, last_epoch, lowest_val_loss

    for rule in (lowest_val_loss, best_val_accuracy, last_epoch):
        model, (kept, history, chosen) = fit_on(rule)
        assert len(history) == 6
        assert chosen is rule(history)
        replay = nn.Linear(8, 3)
        replay.load_state_dict(kept)
        val = evaluate_epoch(replay, loader(24), nn.CrossEntropyLoss(), torch.device("cpu"))
        assert round(val["loss"], 6) == chosen["val_loss"], rule.__name__
    assert torch.equal(kept["weight"], model.weight)  # last_epoch: the final weights


@pytest.mark.parametrize("rule", ["loss", "accuracy"])
def test_a_fit_that_only_hurts_val_gives_back_the_starting_weights_bit_for_bit(rule):
    from pipeline.core.selection import SELECTIONS
    from pipeline.core.training import fit

    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    with torch.no_grad():  # a good model to start from: it points at the class centres
        model.weight.copy_(torch.eye(3, 8))
        model.bias.zero_()
    start = {key: value.clone() for key, value in model.state_dict().items()}
    features, labels = separable(60, 0)
    shuffled = DataLoader(TensorDataset(features, labels[torch.randperm(60)]), batch_size=60)  # noise
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    val = DataLoader(TensorDataset(*separable(60, 1)), batch_size=60)
    start_val = evaluate_epoch(model, val, nn.CrossEntropyLoss(), torch.device("cpu"))
    kept, history, chosen = fit(
        model,
        shuffled,
        val,
        nn.CrossEntropyLoss(),
        optimizer,
        3,
        torch.device("cpu"),
        select=SELECTIONS[rule],
        start_is_candidate=True,
    )
    assert [record["epoch"] for record in history] == [0, 1, 2, 3]
    assert history[0]["val_loss"] == round(start_val["loss"], 6)
    assert all(record["val_loss"] > history[0]["val_loss"] for record in history[1:])
    assert chosen is SELECTIONS[rule](history) is history[0]
    assert kept.keys() == start.keys()
    assert all(torch.equal(kept[key], start[key]) for key in start)
    assert not torch.equal(model.weight, start["weight"])  # it did train, and got worse


def test_a_trained_epoch_that_beats_the_start_replaces_it():
    from pipeline.core.selection import SELECTIONS
    from pipeline.core.training import fit

    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    start = model.weight.detach().clone()
    kept, history, chosen = fit(
        model,
        loader(),
        loader(24),
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.5),
        3,
        torch.device("cpu"),
        select=SELECTIONS["loss"],
        start_is_candidate=True,
    )
    assert chosen is SELECTIONS["loss"](history) and chosen["epoch"] > 0
    assert not torch.equal(kept["weight"], start)
    assert history[0]["val_loss"] > min(record["val_loss"] for record in history[1:])


def test_accuracy_selection_breaks_ties_by_loss_then_by_the_earlier_epoch_and_shuns_nan():
    from pipeline.core.selection import best_val_accuracy

    history = [
        {"epoch": 0, "val_accuracy": 0.9, "val_loss": 0.30},
        {"epoch": 1, "val_accuracy": 0.9, "val_loss": 0.30},
        {"epoch": 2, "val_accuracy": 0.95, "val_loss": float("nan")},
    ]
    assert best_val_accuracy(history) is history[0]
    history.append({"epoch": 3, "val_accuracy": 0.9, "val_loss": 0.25})
    assert best_val_accuracy(history) is history[3]


def test_fit_stops_after_patience_epochs_the_rule_passed_over():
    def always_the_first(history):
        return history[0]

    _, (_, history, _) = fit_on(always_the_first, patience=2)
    assert [record["epoch"] for record in history] == [1, 2, 3]


def test_a_non_finite_val_loss_never_wins_and_the_head_says_so_when_all_are():
    from pipeline.core.errors import StageError
    from pipeline.core.selection import lowest_val_loss

    history = [{"val_loss": float("nan")}, {"val_loss": 2.0}, {"val_loss": float("inf")}]
    assert lowest_val_loss(history) is history[1]
    broken_val = (torch.full((30, 8), float("nan")), separable(30, 1)[1])
    with pytest.raises(StageError, match=r"never finite \(last nan\); lower head\.lr"):
        fit_head(nn.Linear(8, 3), separable(60, 0), broken_val, 0.05, 0.0, 16, 3, 3, seed=0)


def test_bfloat16_amp_runs_autocast_on_the_cpu_for_training_and_extraction():
    """The mixed-precision path a GPU takes, run here: layers compute in bfloat16, weights
    and returned features stay float32, and no loss scaler is used (bfloat16 needs none)."""
    from pipeline.core.training import extract_features

    device = torch.device("cpu")
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    dtypes = []
    model[0].register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    scaler = grad_scaler(device, "bfloat16")
    assert not scaler.is_enabled() and grad_scaler(device, "float16").is_enabled()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[0].weight.detach().clone()
    train = train_epoch(model, loader(), nn.CrossEntropyLoss(), device, optimizer, scaler, amp="bfloat16")
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert model[0].weight.dtype == torch.float32 and not torch.equal(model[0].weight, before)
    assert torch.isfinite(torch.tensor(train["loss"]))

    dtypes.clear()
    features, _ = extract_features(model, loader(), device, "bfloat16")
    assert set(dtypes) == {torch.bfloat16} and features.dtype == torch.float32
    reference, _ = extract_features(model, loader(), device, "off")
    assert torch.allclose(features, reference, atol=0.1, rtol=0.05)  # bfloat16 keeps ~3 digits
    dtypes.clear()
    extract_features(model, loader(), device, "auto")  # auto: float32 off CUDA
    assert set(dtypes) == {torch.float32}


def test_ema_decay_counts_epochs_of_steps_and_is_zero_for_a_step_or_less():
    from pipeline.core.optim import ema_decay

    assert ema_decay(1.0, 10) == pytest.approx(0.9)
    assert ema_decay(2.0, 10) == pytest.approx(0.95)
    assert ema_decay(0.5, 2) == 0.0 and ema_decay(0.1, 3) == 0.0


def test_the_moving_average_starts_at_the_model_and_moves_a_share_of_the_way_each_update():
    from pipeline.core.optim import moving_average

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    start = {key: value.clone() for key, value in model.state_dict().items()}
    average = moving_average(model, decay=0.75)
    assert all(torch.equal(average.module.state_dict()[key], start[key]) for key in start)
    model.train()
    model(torch.randn(16, 4))  # BatchNorm's statistics and batch count move
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update_parameters(model)
    state = average.module.state_dict()
    assert torch.allclose(state["0.weight"], start["0.weight"] + 0.25)
    moved = model[1].running_mean
    assert torch.allclose(state["1.running_mean"], 0.75 * start["1.running_mean"] + 0.25 * moved)
    assert state["1.num_batches_tracked"].item() == 1  # an integer buffer is copied, not averaged


def test_fit_with_a_moving_average_judges_and_keeps_the_average_not_the_model():
    from pipeline.core.optim import moving_average
    from pipeline.core.selection import last_epoch
    from pipeline.core.training import fit

    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    start = model.weight.detach().clone()
    average = moving_average(model, decay=0.9)
    kept, _, chosen = fit(
        model,
        loader(),
        loader(24),
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.5),
        3,
        torch.device("cpu"),
        select=last_epoch,
        start_is_candidate=True,
        average=average,
    )
    assert torch.equal(kept["weight"], average.module.weight)
    assert not torch.equal(kept["weight"], model.weight) and not torch.equal(kept["weight"], start)
    replay = nn.Linear(8, 3)
    replay.load_state_dict(kept)
    val = evaluate_epoch(replay, loader(24), nn.CrossEntropyLoss(), torch.device("cpu"))
    assert round(val["loss"], 6) == chosen["val_loss"]
    # 15 steps at 0.9: the start still weighs 0.9 ** 15 of the average
    share = ((kept["weight"] - model.weight).norm() / (start - model.weight).norm()).item()
    assert 0.05 < share < 0.9


def test_a_pass_sums_its_loss_and_hits_on_the_device_in_float64():
    from pipeline.core.training import Tally

    tally = Tally(torch.device("cpu"))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    tally.add(torch.tensor(0.5), logits[:2], torch.tensor([0, 0]))
    tally.add(torch.tensor(0.25), logits[2:], torch.tensor([0]))
    assert tally.loss.dtype == torch.float64 and tally.correct.dtype == torch.long
    loader = DataLoader(TensorDataset(torch.zeros(3)), batch_size=2)
    assert tally.means(loader) == {"loss": (0.5 * 2 + 0.25) / 3, "accuracy": 2 / 3}
