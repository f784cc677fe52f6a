"""The text modality: what the stages need of texts, behind the seam pipeline.modalities
describes (every function here has its twin in pipeline.modalities.images).

Texts come from CSV, TSV or JSON Lines files (pipeline.modalities.text.files); the
backbone is a Hugging Face encoder (BERT and its family) with its own pretrained weights
or at random init, pooled into one vector per text (pipeline.modalities.text.models). A
split is tokenised once, in one call, when a stage builds its dataset; a batch is one
int64 tensor N x 2 x L (token ids, attention mask), padded to its longest text, with
texts of about one length batched together.

torch and transformers are imported inside the functions that use them: the report stage
imports this module for its view of the mistakes and needs neither.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import ParamsError, StageError
from pipeline.core.params import require_raw_path
from pipeline.core.recipe import ScheduleRule

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from pipeline.core import distributed
    from pipeline.core.checkpoints import BackboneCheckpoint, TextPreprocessing
    from pipeline.core.data import PredictInputs, PredictRequest, Splits
    from pipeline.modalities.text.files import Rows

NAME = "text"
DATASETS = ("text",)
ITEMS = "texts"  # what messages and the report count
# finetune.epochs and batch_size auto: BERT's fine-tuning recipe (Devlin et al. 2019: 2 to 4
# epochs at a batch of 16 or 32), whatever the set's size; the step minimum of the photo
# rule is not measured on texts
AUTO_SCHEDULE = ScheduleRule(epochs=3, batch_size=32, smallest_batch=32, steps_per_epoch=1, min_steps=0)
SKIPPED = "empty text(s) skipped (`data.skip_bad_texts: true`)"  # the report's note
WEIGHTS = ("pretrain", "none")
SHOWN_CHARACTERS = 300  # of each text in the report's table


def check_params(params: dict[str, Any], check_models: bool = True) -> None:
    """The keys whose meaning is the texts': the data's file or folder, no image
    augmentation, and (``check_models``) the backbone."""
    data, finetune = params["data"], params["finetune"]
    if not require_raw_path(data).exists():
        raise ParamsError(
            f"data.path: {data['path']!r} does not exist; put your labelled texts there (a CSV, "
            "TSV or JSON Lines file, or a folder with train/val/test files) and track them with `dvc add`"
        )
    for key, off in (("augment", ("auto", "none")), ("mix", ("none",))):
        if finetune[key] not in off:
            raise ParamsError(
                f"finetune.{key}: {finetune[key]!r} transforms images, and data.modality is text; "
                f"choose {' or '.join(off)}"
            )
    if check_models:
        check_backbone(params["backbone"])


def auto_augment(dataset: str) -> str:
    """``finetune.augment: auto`` for texts: none (the policies transform images)."""
    return "none"


def check_backbone(config: dict[str, Any]) -> None:
    """``backbone.arch`` names a text encoder (not an image model; a folder under
    data/weights/ that holds one) and ``backbone.weights`` is one a text encoder takes:
    checked when params load, before any stage works."""
    from torchvision.models import list_models

    from pipeline.modalities.text import models as text_models

    arch = config["arch"]
    if arch in list_models():
        raise ParamsError(
            f"backbone.arch: {arch!r} is an image model, and data.dataset is text; choose a Hugging "
            "Face text encoder: sentence-transformers/all-MiniLM-L6-v2 (offline, the text extra), "
            "a hub id such as bert-base-uncased, or a model folder under data/weights/"
        )
    text_models.check_arch(arch)
    if config["revision"] != "main" and not text_models.is_hub_id(arch):
        raise ParamsError(
            f"backbone.revision: {config['revision']!r} names a revision on the Hugging Face Hub, "
            f"but {arch!r} is not read from it (a folder under data/weights/, which DVC pins, or an "
            "encoder a package ships); set backbone.revision: main"
        )
    if config["weights"] not in WEIGHTS:
        raise ParamsError(
            f"backbone.weights: {config['weights']!r} is not a choice for a text encoder; choose "
            "pretrain (the encoder's own pretrained weights) or none (random init)"
        )


def prepare_splits(data: dict[str, Any], seed: int) -> tuple[Splits, list[str], list[str]]:
    """The splits of the labelled texts under ``data.path``: a folder's own train/val/test
    files, the missing splits held out of train (or one file split three ways), stratified;
    the class names; the empty texts skipped."""
    from pipeline.core.data import split_given
    from pipeline.modalities.text import files as text_files

    root = Path(data["path"])
    files = text_files.data_files(root)
    rows = {
        split: text_files.read_rows(path, data["text_column"], data["label_column"])
        for split, path in files.items()
    }
    skipped = drop_empty_texts(rows, files, data["skip_bad_texts"])
    for split, part in rows.items():
        if not part.texts and split in ("val", "test"):  # an empty train file has no classes
            raise StageError(
                f"{files[split]}: holds no texts; add labelled texts to it, or remove it to hold "
                f"{split} out of the training texts (data.{split}_fraction)"
            )
    classes = class_names(root, rows, files)
    check_class_sizes(rows, files, classes)
    given = {
        split: (
            {"texts": part.texts, "sources": part.sources},
            np.array([classes.index(label) for label in part.labels], dtype=np.int64),
        )
        for split, part in rows.items()
    }
    fractions = (data["val_fraction"], data["test_fraction"], data["max_train_per_class"], seed)
    return split_given(given, *fractions, what="texts", min_val=data["min_val_examples"]), classes, skipped


def drop_empty_texts(rows: dict[str, Rows], files: dict[str, Path], skip: bool) -> list[str]:
    """Empty or whitespace-only texts: an error that lists them (file and line), or, with
    ``data.skip_bad_texts``, dropped; returns the sources of those dropped."""
    from pipeline.modalities.text.files import refuse

    skipped = []
    for split, part in rows.items():
        empty = [i for i, text in enumerate(part.texts) if not text.strip()]
        if empty and not skip:
            problems = [f"line {part.sources[i].rsplit(':', 1)[1]}: an empty text" for i in empty]
            refuse(files[split], [*problems[:-1], problems[-1] + " (data.skip_bad_texts: true skips them)"])
        for i in reversed(empty):
            skipped.append(part.sources.pop(i))
            del part.texts[i], part.labels[i]
    return sorted(skipped)


def class_names(root: Path, rows: dict[str, Rows], files: dict[str, Path]) -> list[str]:
    """The classes in label order: labels.txt's where the folder has one, else the training
    labels in natural order; a label outside them is an error naming its file and line."""
    from pipeline.modalities.text.files import LABELS_FILE, natural_order, read_labels_file, refuse

    training = rows.get("all") or rows["train"]
    labels_file = root / LABELS_FILE if root.is_dir() else None
    if labels_file is not None and labels_file.is_file():
        classes, known = read_labels_file(labels_file), f"the classes {LABELS_FILE} names"
        untaught = [name for name in classes if name not in training.labels]
        if untaught:
            raise StageError(
                f"{labels_file}: names {len(untaught)} class(es) that "
                f"{files.get('all') or files['train']} has no text of: {', '.join(untaught)}; "
                "add training texts of them or remove them from the file"
            )
    else:
        classes, known = natural_order(set(training.labels)), "the training labels"
    for split, part in rows.items():
        pairs = zip(part.sources, part.labels, strict=True)
        unknown = [(source.rsplit(":", 1)[1], label) for source, label in pairs if label not in classes]
        listed = ", ".join(classes)
        refuse(
            files[split],
            [f"line {line}: label {label!r} is not among {known} ({listed})" for line, label in unknown],
        )
    if len(classes) < 2:
        raise StageError(
            f"data.path: {files.get('all') or files['train']} holds {len(classes)} class(es) "
            f"({', '.join(classes) or 'none'}); a classifier needs at least 2"
        )
    return classes


def check_class_sizes(rows: dict[str, Rows], files: dict[str, Path], classes: list[str]) -> None:
    """Holding a split out stratified takes at least 2 texts of each class: name the classes
    that have fewer, before any split is tried."""
    held_out = [name for name in ("val", "test") if name not in rows]
    if not held_out:
        return
    source = "all" if "all" in rows else "train"
    counts = {name: rows[source].labels.count(name) for name in classes}
    few = [f"{name!r} ({count})" for name, count in counts.items() if count < 2]
    if few:
        raise StageError(
            f"{files[source]}: class(es) with fewer than 2 texts: {', '.join(few)}; holding out "
            f"{' and '.join(held_out)} stratified needs at least 2 of each; add texts of them, or "
            f"give {' and '.join(f'{name}.csv' for name in held_out)} files of your own"
        )


def materialize(
    config: dict[str, Any],
    seed: int,
    device: torch.device,
    amp: str,
    ranks: distributed.Ranks,
    settings: dict[str, Any],
) -> tuple[BackboneCheckpoint, dict[str, Any]]:
    """The encoder checkpoint and its metrics: ``backbone.arch`` with its own pretrained
    weights (``pretrain``) or at random init (``none``, seeded), its config and tokenizer
    kept beside the weights. Nothing trains here, so ``device`` and the processes are
    unused."""
    from pipeline.core.checkpoints import backbone_checkpoint
    from pipeline.modalities.text import models as text_models

    chosen = preprocessing(config)
    if config["weights"] == "pretrain":
        model = text_models.pretrained_encoder(config["arch"], chosen["revision"] or "main")
    else:
        model = text_models.encoder_from_config(chosen["config"])
    unpinned = unpinned_warning(config["arch"], config["revision"], chosen["revision"])
    if unpinned and ranks.main:
        print(unpinned)
    encoder = text_models.TextEncoder(model, config["pooling"])
    metrics = {"parameters": sum(p.numel() for p in encoder.parameters()), "revision": chosen["revision"]}
    features = text_models.hidden_size(chosen["config"])
    return backbone_checkpoint(chosen, features, encoder.state_dict()), metrics


def unpinned_warning(arch: str, revision: str, commit: str) -> str | None:
    """A warning where a hub id is read at a branch or tag, which can move upstream without
    DVC seeing it: it names the commit it resolved to, to pin."""
    from pipeline.modalities.text import models as text_models

    if not text_models.is_hub_id(arch) or text_models.is_commit(revision):
        return None
    return (
        f"backbone: warning: {arch} was read at revision {revision!r} (commit {commit or 'unknown'}), which "
        "can move on the Hugging Face Hub while params.yaml stays the same, and DVC would not rerun; "
        f"set backbone.revision: {commit or '<a commit hash>'} to pin it, or copy the model folder "
        "under data/weights/"
    )


def preprocessing(config: dict[str, Any], weights: str | None = None) -> TextPreprocessing:
    """How texts reach the encoder params' ``backbone`` section names: its config (at
    ``backbone.revision``, for a hub id) and tokenizer, the length, truncation side, padding
    and pooling, and the hub commit read ("" where the encoder is not read from the hub). A
    ``max_length`` beyond the encoder's positions, or too short to hold a token beside the
    special tokens, is an error."""
    from pipeline.modalities.text import models as text_models

    arch = config["arch"]
    # One commit for the config, the tokenizer and (in materialize) the weights.
    commit = text_models.hub_commit(arch, config["revision"]) if text_models.is_hub_id(arch) else ""
    hf_config = text_models.load_config(arch, commit or config["revision"])
    positions = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(positions, int) and config["max_length"] > positions:
        raise StageError(
            f"backbone.max_length: {config['max_length']} tokens, but {arch} has positions for "
            f"{positions}; use {positions} or fewer"
        )
    tokenizer = text_models.load_tokenizer_json(arch, commit or config["revision"])
    special = text_models.special_tokens(tokenizer)
    if config["max_length"] <= special:
        raise StageError(
            f"backbone.max_length: {config['max_length']} tokens leaves none for the text: {arch}'s "
            f"tokenizer adds {special} special token(s) to each; use at least {special + 1} "
            "(128 or more reads most of a sentence or two)"
        )
    settings = {
        key: value
        for key, value in hf_config.to_dict().items()
        if key not in ("_name_or_path", "transformers_version")  # this machine's path, the version
    }
    return {
        "modality": NAME,
        "arch": arch,
        "weights": weights or config["weights"],
        "revision": commit,
        "config": settings,
        "tokenizer": tokenizer,
        "max_length": config["max_length"],
        "truncation": config["truncation"],
        "padding": config["padding"],
        "pooling": config["pooling"],
    }


def random_init_backbone(config: dict[str, Any]) -> tuple[nn.Module, TextPreprocessing]:
    """``backbone.arch`` at random init (from torch's seeded generator), for the baseline,
    fed as the pretrained one is: the same tokenizer, length, padding and pooling."""
    from pipeline.modalities.text import models as text_models

    chosen = preprocessing(config, weights="none")
    model = text_models.encoder_from_config(chosen["config"])
    return text_models.TextEncoder(model, chosen["pooling"]), chosen


def build_backbone(preprocessing: dict[str, Any]) -> nn.Module:
    """The encoder ``preprocessing`` describes, with untrained weights (load_backbone puts a
    checkpoint's in)."""
    from pipeline.modalities.text import models as text_models

    model = text_models.encoder_from_config(preprocessing["config"])
    return text_models.TextEncoder(model, preprocessing["pooling"])


def batch_mixing(mix: str, alpha: float, num_classes: int) -> None:
    """Texts are not mixed: params refuse ``finetune.mix`` for them."""
    return None


def dataset(prepared_dir: Path, split: str, preprocessing: dict[str, Any], augment: str = "none") -> Dataset:
    """A prepared split tokenised once, as (token ids, label) items with their ``lengths``,
    a ``collate`` that pads a batch, and ``truncated``: how many texts lost tokens. Texts
    have no augmentation (``augment`` is the images')."""
    from pipeline.core.data import load_split
    from pipeline.modalities.text import models as text_models

    columns, labels = load_split(prepared_dir, split)
    ids, truncated = text_models.tokenise(preprocessing, columns["texts"])
    tokens = text_models.Tokens(
        ids, labels, text_models.pad_id(preprocessing), preprocessing["padding"], preprocessing["max_length"]
    )
    tokens.truncated = truncated
    return tokens


def blocks(backbone: nn.Module) -> list[nn.Module]:
    """The encoder's transformer layers in order, for ``finetune.unfreeze``."""
    from pipeline.modalities.text.models import encoder_blocks

    return encoder_blocks(backbone)


def add_adapters(backbone: nn.Module, checkpoint: dict[str, Any], config: dict[str, Any]) -> None:
    """LoRA adapters of rank ``finetune.adapter_rank`` beside the frozen encoder's attention
    projections (PEFT)."""
    from pipeline.modalities.text.models import add_lora

    add_lora(backbone, config["adapter_rank"])


def fold_adapters(model: nn.Module) -> nn.Module:
    """The model with its LoRA updates merged into the encoder's weights (a plain encoder)."""
    from pipeline.modalities.text.models import merge_lora

    merge_lora(model.backbone)
    return model


def onnx_signature(
    model: nn.Module, checkpoint: dict[str, Any]
) -> tuple[nn.Module, tuple, list[dict[str, Any]], tuple]:
    """What the export traces: the model taking token ids and attention mask, an example of
    each, their description for model.json, and their dynamic axes (batch, and sequence up
    to ``max_length``)."""
    import torch

    from pipeline.modalities.text.models import OnnxTextInputs

    longest = checkpoint["max_length"]
    inputs = [
        {"name": name, "shape": ["batch", "sequence"], "dtype": "int64", "meaning": meaning}
        for name, meaning in (
            ("input_ids", f"token ids from the tokenizer in model.json, at most {longest} a text"),
            ("attention_mask", "1 for a token, 0 for padding"),
        )
    ]
    batch, sequence = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1, max=longest)
    example = (torch.full((2, 8), 100, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    return OnnxTextInputs(model), example, inputs, ({0: batch, 1: sequence}, {0: batch, 1: sequence})


def onnx_feed(batch: torch.Tensor) -> dict[str, np.ndarray]:
    """A batch as onnxruntime's inputs."""
    return {"input_ids": batch[:, 0].numpy(), "attention_mask": batch[:, 1].numpy()}


def predict_inputs(request: PredictRequest, meta: dict[str, Any]) -> PredictInputs:
    """Texts for ``python -m pipeline predict``: ``--text`` arguments, then each PATH: a CSV,
    TSV or JSON Lines file (its ``text_column``), ``-`` (standard input) or any other file,
    one text a line (blank lines skipped). An empty text, or a row that cannot be read, is
    a row with its error; texts are tokenised once and predicted longest first."""
    import sys

    from pipeline.core.data import PredictInputs
    from pipeline.modalities.text import models as text_models
    from pipeline.modalities.text.files import FORMATS, decoded, lines_of, records

    sources, found, problems = [], [], []

    def add(source: str, content: str, problem: str = "") -> None:
        sources.append(source)
        found.append(content)
        problems.append(problem or ("" if content.strip() else "an empty text"))

    for number, content in enumerate(request.texts, start=1):
        add(f"--text {number}", content)
    for name in request.paths:
        path = Path(name)
        if name == "-":
            lines = [(f"stdin:{number}", line) for number, line in enumerate(lines_of(sys.stdin.read()), 1)]
        elif path.is_file() and path.suffix.lower() in FORMATS:
            for record in records(path, request.text_column, text_key="--text-column"):
                add(f"{path}:{record.line}", record.text, record.problem)
            continue
        elif path.is_file():
            lines = [(f"{path}:{number}", line) for number, line in enumerate(lines_of(decoded(path)), 1)]
        elif path.is_dir():
            raise StageError(f"{name}: a folder; give text files (.csv, .tsv, .jsonl, or one text a line)")
        else:
            raise StageError(f"{name}: no such file or folder")
        for source, line in lines:
            if line.strip():
                add(source, line)
    if not sources:
        raise StageError("no texts given; pass files, - for standard input, or --text 'a text'")
    dataset = text_models.TextsToPredict(found, problems, meta)
    pad_id = text_models.pad_id(meta)
    return PredictInputs(
        columns={"source": sources, "text": found},
        dataset=dataset,
        stack=lambda rows: text_models.pad(rows, pad_id, meta["padding"], meta["max_length"]),
        order=sorted(range(len(found)), key=lambda index: -dataset.lengths[index]),
        items="text(s)",
        unreadable="text(s) could be read",
    )


def write_samples(prepared_dir: Path, split: str, keep: list[int], classes: list[str], out: Path) -> None:
    """The ``keep`` texts of a prepared split as one CSV, ``out/<split>.csv`` (columns index,
    text, label), which predict reads."""
    import csv

    from pipeline.core.common import atomic_path
    from pipeline.core.data import load_split

    columns, labels = load_split(prepared_dir, split)
    rows = [(index, columns["texts"][index], classes[labels[index]]) for index in keep]
    with atomic_path(out) as staged:
        staged.mkdir()
        with open(staged / f"{split}.csv", "w", newline="", encoding="utf-8") as file:
            csv.writer(file).writerows([("index", "text", "label"), *rows])


def describe(backbone: dict[str, Any]) -> str:
    """How texts reach the encoder (params' ``backbone`` section), for the report's first line."""
    side = "their end kept" if backbone["truncation"] == "left" else "their start kept"
    return (
        f"reading at most {backbone['max_length']} tokens a text ({side}), {backbone['pooling']}-pooled, "
        f"padding {'each batch to its longest text' if backbone['padding'] == 'dynamic' else 'to max_length'}"
    )


def mistakes_view(rows: list[dict[str, str]], prepared_dir: Path, save_figure: Callable) -> str:
    """The report's view of the highest-loss test texts (``rows``, highest first): a table
    of each text (its first SHOWN_CHARACTERS characters), true class, prediction,
    probability and loss."""
    from pipeline.core.data import load_split

    columns, _ = load_split(prepared_dir, "test")
    lines = [
        f"The {len(rows)} test texts with the highest loss (the probability is the predicted class's):",
        "",
        "| text | true | predicted | probability | loss |",
        "|---|---|---|---:|---:|",
    ]
    for row in rows:
        text = " ".join(columns["texts"][int(row["index"])].split())
        if len(text) > SHOWN_CHARACTERS:
            text = text[:SHOWN_CHARACTERS].rstrip() + "…"
        cell = text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")
        mark = "" if row["actual"] == row["predicted"] else " ✗"
        lines.append(
            f"| {cell} | {row['actual']} | {row['predicted']}{mark} | {float(row['probability']):.2f} "
            f"| {float(row['loss']):.2f} |"
        )
    return "\n".join(lines)
