"""Benchmark: the two baselines a practitioner tries before fine-tuning, on the pipeline's splits.

1. TF-IDF (word 1- and 2-grams, sublinear tf) and scikit-learn's logistic regression;
2. scikit-learn's logistic regression on the encoder's frozen mean-pooled embeddings
   (the sentence-transformers way of using all-MiniLM-L6-v2).

Each fits on the train split the pipeline's prepare stage makes for a seed (and a cap on
training texts per class), picks its regularisation C on the val split, and is scored on
the test split: the same texts the strategies in the README's table saw. Prints a markdown
table of test accuracy, mean ± std over the seeds.
Run from the repository root: ``python -m benchmarks.text_baselines [--per-class 0 8 64]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks import results
from benchmarks.text_speed import ARCH, minilm_preprocessing
from pipeline.modalities import text
from pipeline.modalities.text import models as text_models

DATA = Path("../shared/data/agnews-dev")
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def splits(per_class: int, seed: int, folder: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """The texts and labels of the splits prepare makes: the committed params' data section
    (fractions, the val floor), on texts."""
    committed = yaml.safe_load((results.ROOT / "params.yaml").read_text())["data"]
    data = {
        **committed,
        "modality": "text",
        "dataset": "text",
        "path": str(folder),
        "max_train_per_class": per_class,
    }
    made, _, _ = text.prepare_splits(data, seed)
    return {name: (columns["texts"], labels) for name, (columns, labels) in made.items()}


def best_on_val(parts: dict, features) -> float:
    """Test accuracy of the logistic regression whose C scores best on val."""
    from sklearn.linear_model import LogisticRegression

    train, val, test = parts["train"], parts["val"], parts["test"]
    fitted = []
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=3000).fit(features(train[0]), train[1])
        fitted.append((model.score(features(val[0]), val[1]), c, model))
    _, _, model = max(fitted, key=lambda entry: (entry[0], -entry[1]))
    return model.score(features(test[0]), test[1])


def tfidf_accuracy(parts: dict) -> float:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1).fit(parts["train"][0])
    return best_on_val(parts, vectorizer.transform)


def embeddings(texts: list[str]) -> dict[str, np.ndarray]:
    """Each text's frozen mean-pooled MiniLM embedding, by text."""
    preprocessing = minilm_preprocessing()
    encoder = text_models.TextEncoder(text_models.pretrained_encoder(ARCH), "mean").eval()
    ids, _ = text_models.tokenise(preprocessing, texts)
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    vectors = {}
    with torch.inference_mode():
        for start in range(0, len(order), 128):
            chosen = order[start : start + 128]
            batch = text_models.pad([torch.tensor(ids[i]) for i in chosen], 0, "dynamic", 128)
            for i, vector in zip(chosen, encoder(batch).numpy(), strict=True):
                vectors[texts[i]] = vector
    return vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[0, 64, 8], help="0: every training text")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(shutil.copytree(DATA, Path(folder) / "agnews-dev"))
        runs = {(cap, seed): splits(cap, seed, copy) for cap in args.per_class for seed in args.seeds}
    every_text = sorted({t for parts in runs.values() for texts, _ in parts.values() for t in texts})
    vectors = embeddings(every_text)

    def embedded(texts: list[str]) -> np.ndarray:
        return np.stack([vectors[t] for t in texts])

    measured = []
    for cap in args.per_class:
        for name, score in (
            ("TF-IDF + logistic regression", tfidf_accuracy),
            ("logistic regression on frozen MiniLM embeddings", lambda parts: best_on_val(parts, embedded)),
        ):
            scores = {seed: round(100 * score(runs[cap, seed]), 4) for seed in args.seeds}
            measured.append({"baseline": name, "per_class": cap, "accuracy_by_seed": scores})
            print(measured[-1], flush=True)
    caps = " ".join(map(str, args.per_class))
    seeds = " ".join(map(str, args.seeds))
    command = f"python -m benchmarks.text_baselines --per-class {caps} --seeds {seeds}"
    print(table(results.save(NAME, command, measured)))


NAME = "text_baselines"


def table(record: dict) -> str:
    """Each baseline's test accuracy, mean ± std over its seeds, from the results file."""
    lines = ["| baseline | training texts per class | seeds | test accuracy (%) |", "|---|---|---:|---:|"]
    for row in record["results"]:
        scores = list(row["accuracy_by_seed"].values())
        spread = f" ± {statistics.stdev(scores):.2f}" if len(scores) > 1 else ""
        lines.append(
            f"| {row['baseline']} | {row['per_class'] or 'all'} | {len(scores)} | "
            f"{statistics.fmean(scores):.2f}{spread} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
