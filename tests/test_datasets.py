"""Annotation files, image opening, transforms and the pretraining data set on tiny files in tmp_path."""

import json
import pickle
import random

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets import transforms
from datasets.base import FAILURES_BEFORE_GIVING_UP, AnnotationError, Annotations, ImageLoadError, open_image
from datasets.pretrain import PretrainDataset, collate_pretrain
from datasets.text import build_tokenizer


def write_image(path, colour=(200, 30, 90), size=(12, 10)):
    Image.new("RGB", size, colour).save(path)
    return path.name


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def pretrain_files(tmp_path):
    """Two annotation files: 3 good entries, then one missing image, one corrupt JPEG, one good."""
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.jpg", colour=(10, 20, 30))
    (tmp_path / "bad.jpg").write_bytes(b"this is not a jpeg" * 10)
    first = write_json(tmp_path / "first.json", [
        {"image": "a.png", "caption": "A red square!"},
        {"image": "b.jpg", "caption": ["One caption.", "Another-caption"]},
        {"image": "a.png", "caption": ["only one"]},
    ])
    second = write_json(tmp_path / "second.json", [
        {"image": "missing.png", "caption": "gone"},
        {"image": "bad.jpg", "caption": "broken"},
        {"image": "b.jpg", "caption": "last good"},
    ])
    return tmp_path, [str(first), str(second)]


def test_annotations_concatenate_and_locate(pretrain_files):
    root, files = pretrain_files
    ann = Annotations(files)
    assert len(ann) == 6 and ann[3]["image"] == "missing.png"
    assert ann.where(2) == f"{files[0]} entry 2" and ann.where(4) == f"{files[1]} entry 1"
    assert Annotations(files[0]).where(0) == f"{files[0]} entry 0"


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"image": "a.png", "caption": "x"},\n  {"image": "b.png" "caption": "y"}\n]\n')
    with pytest.raises(AnnotationError, match=r"broken\.json at line 3, column"):
        Annotations([str(path)])


def test_bad_annotation_files(tmp_path):
    with pytest.raises(AnnotationError, match="nothere.json"):
        Annotations([str(tmp_path / "nothere.json")])
    with pytest.raises(AnnotationError, match="obj.json must hold a JSON list"):
        Annotations(write_json(tmp_path / "obj.json", {"image": "a"}))
    with pytest.raises(AnnotationError, match="items.json entry 1: expected an object"):
        Annotations(write_json(tmp_path / "items.json", [{}, "x"]))
    ann = Annotations(write_json(tmp_path / "keys.json", [{"image": "a.png"}]))
    with pytest.raises(AnnotationError, match="keys.json entry 0: missing key 'caption'"):
        ann.field(0, "caption")


def test_open_image_converts_to_rgb(tmp_path):
    Image.new("L", (4, 3), 77).save(tmp_path / "grey.png")
    img = open_image(tmp_path / "grey.png")
    assert img.mode == "RGB" and img.size == (4, 3) and img.getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_truncated_or_garbled_image_is_an_error_not_a_grey_image(tmp_path, suffix):
    """Not the original (which decodes the half it has): a cut or garbled file names itself."""
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / f"full.{suffix}")
    data = (tmp_path / f"full.{suffix}").read_bytes()
    (tmp_path / f"cut.{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=rf"cut\.{suffix}.*truncated"):
        open_image(tmp_path / f"cut.{suffix}")
    if suffix == "png":  # deflate data with 64 bytes of garbage: zlib's check fails
        middle = len(data) // 2
        (tmp_path / "garbled.png").write_bytes(data[:middle] + bytes(range(64)) + data[middle + 64:])
        with pytest.raises(ImageLoadError, match="garbled.png"):
            open_image(tmp_path / "garbled.png")


@pytest.mark.parametrize("index, image, entry", [(3, "missing.png", 0), (4, "bad.jpg", 1)])
def test_a_missing_or_corrupt_image_error_names_file_and_entry(pretrain_files, index, image, entry):
    root, files = pretrain_files
    ds = PretrainDataset(files, transforms.test_transform(8), image_root=str(root))
    with pytest.raises(ImageLoadError) as err:
        ds[index]
    msg = str(err.value)
    assert str(root / image) in msg and f"{files[1]} entry {entry}" in msg


def test_skip_bad_images_counts_and_is_deterministic(pretrain_files):
    root, files = pretrain_files
    ds = PretrainDataset(files, transforms.test_transform(8), image_root=str(root), skip_bad_images=True)
    image, caption = ds[3]  # missing -> corrupt -> entry 5
    assert caption == "last good" and ds.num_skipped == 2
    assert ds[4][1] == "last good" and ds.num_skipped == 3
    assert ds[0][1] == "a red square" and ds.num_skipped == 3


def test_a_wrong_image_root_stops_early_naming_it(tmp_path, caplog):
    """With skip_bad_images, the first FAILURES_BEFORE_GIVING_UP failures in a row stop the run, and only
    the first few skips are logged."""
    entries = [{"image": f"{i}.png", "caption": "x"} for i in range(FAILURES_BEFORE_GIVING_UP + 5)]
    ds = PretrainDataset(write_json(tmp_path / "a.json", entries), transforms.test_transform(8),
                         image_root=str(tmp_path / "wrong"), skip_bad_images=True)
    with pytest.raises(ImageLoadError, match=rf"first {FAILURES_BEFORE_GIVING_UP} images .*image_root .*wrong"):
        ds[0]
    assert len(caplog.records) == PretrainDataset.WARNINGS


def test_skips_after_a_good_image_go_on(tmp_path):
    write_image(tmp_path / "a.png")
    entries = [{"image": "a.png", "caption": "good"}] + [{"image": f"{i}.png", "caption": "x"} for i in range(150)]
    ds = PretrainDataset(write_json(tmp_path / "a.json", entries), transforms.test_transform(8),
                         image_root=str(tmp_path), skip_bad_images=True)
    assert ds[0][1] == "good" and ds[1][1] == "good" and ds.num_skipped == 150


def test_text_fields_must_be_text(tmp_path):
    for key, value in (("caption", 7), ("sentence", None), ("question", ["ok", 3]), ("text", {"a": 1})):
        path = write_json(tmp_path / f"{key}.json", [{"image": "a.png", key: "fine"}, {"image": "a.png", key: value}])
        with pytest.raises(AnnotationError, match=rf"{key}\.json entry 1: '{key}' must be text"):
            Annotations(path)
    Annotations(write_json(tmp_path / "lists.json", [{"caption": ["a", "b"], "answer": ["yes"]}]))


def test_an_empty_annotation_file_is_an_error(tmp_path):
    with pytest.raises(AnnotationError, match="no entries in .*empty.json"):
        Annotations(write_json(tmp_path / "empty.json", []))
    assert len(Annotations([write_json(tmp_path / "e.json", []), write_json(tmp_path / "f.json", [{}])])) == 1


def test_caption_string_and_list(pretrain_files):
    root, files = pretrain_files
    ds = PretrainDataset(files, transforms.test_transform(8), image_root=str(root), max_words=30)
    assert ds[0][1] == "a red square"
    assert ds[2][1] == "only one"
    random.seed(0)
    seen = {ds[1][1] for _ in range(50)}
    assert seen == {"one caption", "another caption"}  # a fresh random pick each read, normalised
    short = PretrainDataset(files, transforms.test_transform(8), image_root=str(root), max_words=1)
    assert short[0][1] == "a"


def test_empty_caption_list_is_an_annotation_error(tmp_path):
    write_image(tmp_path / "a.png")
    ds = PretrainDataset(write_json(tmp_path / "e.json", [{"image": "a.png", "caption": []}]),
                         transforms.test_transform(8), image_root=str(tmp_path))
    with pytest.raises(AnnotationError, match="e.json entry 0: empty caption list"):
        ds[0]


def test_collate_pretrain_shapes_and_dtypes(pretrain_files, bert_vocab_dir):
    root, files = pretrain_files
    ds = PretrainDataset(files[:1], transforms.train_transform(16), image_root=str(root))
    collate = collate_pretrain(build_tokenizer(bert_vocab_dir))
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert set(batch) == {"image", "input_ids", "attention_mask"}
    assert batch["image"].shape == (3, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"][0].tolist() == [101, 1037, 2417, 2675]  # [CLS] a red square, no [SEP]
    assert batch["input_ids"][:, 0].eq(101).all() and not batch["input_ids"].eq(102).any()
    pickle.loads(pickle.dumps(collate))  # usable by DataLoader workers


def test_collate_truncates_to_25_tokens(bert_vocab_dir):
    collate = collate_pretrain(build_tokenizer(bert_vocab_dir))
    image = torch.zeros(3, 4, 4)
    batch = collate([(image, " ".join(["dog"] * 40)), (image, "a cat")])
    assert batch["input_ids"].shape == (2, 25) and batch["attention_mask"][1].sum() == 3


def test_test_transform_shape_and_normalisation():
    image = Image.new("RGB", (20, 12), (255, 128, 0))
    out = transforms.test_transform(8)(image)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    mean, std = torch.tensor(transforms.MEAN), torch.tensor(transforms.STD)
    expected = (torch.tensor([255, 128, 0]) / 255 - mean) / std
    torch.testing.assert_close(out, expected[:, None, None].expand(3, 8, 8))


@pytest.mark.parametrize("scale", [transforms.PRETRAIN_SCALE, transforms.FINETUNE_SCALE, None])
def test_train_transform_shape_and_seeded(scale):
    image = Image.effect_noise((40, 30), 60).convert("RGB")
    t = transforms.train_transform(16, scale=scale)
    torch.manual_seed(0)
    a = t(image)
    torch.manual_seed(0)
    b = t(image)
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    lo = (0 - torch.tensor(transforms.MEAN)) / torch.tensor(transforms.STD)
    hi = (1 - torch.tensor(transforms.MEAN)) / torch.tensor(transforms.STD)
    assert (a >= lo[:, None, None] - 1e-6).all() and (a <= hi[:, None, None] + 1e-6).all()
