"""scripts/prepare_demo_data.py on the first 200 easy-vqa images: formats, splits, balance, detection."""

import json
import re
from collections import Counter
from pathlib import Path

import easy_vqa
import pytest

from scripts import prepare_demo_data as demo

LIMIT = 200
FILES = ("pretrain", "retrieval_train", "retrieval_val", "retrieval_test", "vqa_train", "vqa_test", "answer_list",
         "nlvr_train", "nlvr_dev", "nlvr_test", "ve_train", "ve_dev", "ve_test", "itm_val", "itm_test", "meta")


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo")
    demo.main(["--out", str(path), "--limit", str(LIMIT), "--seed", "0"])
    return path


def load(out: Path, name: str) -> list | dict:
    return json.loads((out / f"{name}.json").read_text())


def check_entry(entry: dict, keys: dict[str, type]) -> None:
    assert set(entry) == set(keys), entry
    for key, kind in keys.items():
        assert isinstance(entry[key], kind), (key, entry)


def test_every_file_parses_and_images_exist(out: Path) -> None:
    for name in FILES:
        data = load(out, name)
        assert data, name
        if name in ("meta", "answer_list"):
            continue
        for entry in data:
            paths = entry["images"] if "images" in entry else [entry["image"]]
            assert all((out / p).is_file() and not Path(p).is_absolute() for p in paths), entry
    assert len(list((out / "images").glob("*.png"))) == LIMIT


def test_formats(out: Path) -> None:
    for e in load(out, "pretrain"):
        check_entry(e, {"image": str, "caption": list})
        assert len(e["caption"]) == 3 and len(set(e["caption"])) == 3
    for e in load(out, "retrieval_train"):
        check_entry(e, {"image": str, "caption": str, "image_id": int})
    for split in ("val", "test"):
        for e in load(out, f"retrieval_{split}"):
            check_entry(e, {"image": str, "caption": list})
    answers = set(load(out, "answer_list"))
    ids = []
    for split in ("train", "test"):
        for e in load(out, f"vqa_{split}"):
            check_entry(e, {"question_id": int, "image": str, "question": str, "answer": list, "dataset": str})
            assert set(e["answer"]) <= answers and e["dataset"] == "vqa"
            ids.append(e["question_id"])
    assert len(ids) == len(set(ids))
    for split in ("train", "dev", "test"):
        for e in load(out, f"nlvr_{split}"):
            check_entry(e, {"images": list, "sentence": str, "label": str})
            assert len(e["images"]) == 2 and e["label"] in ("True", "False")
        for e in load(out, f"ve_{split}"):
            check_entry(e, {"image": str, "sentence": str, "label": str})
        labels = Counter(e["label"] for e in load(out, f"ve_{split}"))
        assert set(labels) == {"entailment", "neutral", "contradiction"} and len(set(labels.values())) == 1


def test_held_out_images_stay_out_of_pretraining(out: Path) -> None:
    pretrain = {e["image"] for e in load(out, "pretrain")}
    assert pretrain == {e["image"] for e in load(out, "retrieval_train")}
    assert pretrain == {e["image"] for e in load(out, "vqa_train")}
    for name in ("retrieval_val", "retrieval_test", "vqa_test", "nlvr_dev", "nlvr_test", "ve_dev", "ve_test"):
        images = {p for e in load(out, name) for p in e.get("images", [e.get("image")])}
        assert images and not images & pretrain, name
    assert not {e["image"] for e in load(out, "retrieval_val")} & {e["image"] for e in load(out, "retrieval_test")}


def test_nlvr_labels_are_balanced(out: Path) -> None:
    for split in ("train", "dev", "test"):
        labels = Counter(e["label"] for e in load(out, f"nlvr_{split}"))
        assert labels["True"] == labels["False"] > 0, (split, labels)


def test_pixel_colour_matches_easy_vqa_answers() -> None:
    texts, answers, image_ids = easy_vqa.get_train_questions()
    truth = {i: a for q, a, i in zip(texts, answers, image_ids) if q.startswith("what color") or "color of" in q}
    paths = easy_vqa.get_train_image_paths()
    checked = [i for i in range(LIMIT) if i in truth]
    agree = sum(demo.measure(f"train_{i}", Path(paths[i])).pixel_colour == truth[i] for i in checked)
    assert len(checked) > 50 and agree / len(checked) >= 0.9


def test_meta_and_rerun_gives_identical_files(out: Path, tmp_path: Path) -> None:
    meta = load(out, "meta")
    assert meta["images"] == LIMIT and meta["detection"]["colour_agreement"] >= 0.9
    assert meta["counts"]["pretrain"] == meta["split_images"]["pretrain"]
    demo.main(["--out", str(tmp_path), "--limit", str(LIMIT), "--seed", "0"])
    demo.main(["--out", str(tmp_path), "--limit", str(LIMIT), "--seed", "0"])
    for name in FILES:
        assert (tmp_path / f"{name}.json").read_bytes() == (out / f"{name}.json").read_bytes(), name


def test_splits_follow_easy_vqa(out: Path) -> None:
    """Training pictures are easy-vqa's train split; every held-out file reads its test split, and VQA is
    scored on easy-vqa's own test questions, all of them."""
    for name in ("pretrain", "retrieval_train", "vqa_train", "ve_train"):
        assert all(Path(e["image"]).stem.startswith("train_") for e in load(out, name)), name
    for name in ("retrieval_val", "retrieval_test", "vqa_test", "ve_dev", "ve_test", "itm_val", "itm_test"):
        assert all(Path(e["image"]).stem.startswith("test_") for e in load(out, name)), name
    test_images = sorted(easy_vqa.get_test_image_paths())[: LIMIT // 5]
    texts, answers, image_ids = easy_vqa.get_test_questions()
    expected = sorted((q, a) for q, a, i in zip(texts, answers, image_ids) if i in set(test_images))
    assert sorted((e["question"], e["answer"][0]) for e in load(out, "vqa_test")) == expected


def test_itm_pairs_swap_one_attribute(out: Path) -> None:
    """Each true caption comes with itself with the colour swapped, the shape swapped, and (where the
    template names one) the size or the position swapped: the same words but for that one slot."""
    pairs = load(out, "itm_test")
    assert {e["image"] for e in pairs} == {e["image"] for e in load(out, "retrieval_test")}
    kinds = Counter(e["kind"] for e in pairs)
    assert kinds["match"] == kinds["colour"] == kinds["shape"] > 0 and kinds["size"] + kinds["position"] > 0
    words = {"colour": set(demo.COLOURS), "shape": set(demo.SHAPES), "size": set(demo.SIZES)}
    truth = None
    for e in pairs:
        assert e["label"] == (e["kind"] == "match")
        if e["kind"] == "match":
            truth = re.findall(r"[a-z]+", e["caption"])
            continue
        wrong = re.findall(r"[a-z]+", e["caption"])
        if e["kind"] in words:
            assert len(wrong) == len(truth)
            diff = [(a, b) for a, b in zip(truth, wrong) if a != b]
            assert len(diff) == 1 and {diff[0][0], diff[0][1]} <= words[e["kind"]], (truth, wrong)
        else:
            assert wrong != truth and set(truth) & words["colour"] == set(wrong) & words["colour"]


def test_drawn_pictures_join_training_only(tmp_path: Path) -> None:
    meta = demo.main(["--out", str(tmp_path), "--limit", "40", "--extra", "12"])
    drawn = [e for e in load(tmp_path, "pretrain") if Path(e["image"]).stem.startswith("gen_")]
    assert len(drawn) == 12 and meta["split_images"]["pretrain"] == 32 + 12
    for e in drawn:  # the caption names the drawn colour and shape, read back from the pixels
        item = demo.measure("x", tmp_path / e["image"])
        words = re.findall(r"[a-z]+", e["caption"][0])
        assert item.pixel_colour in words
        assert item.pixel_shape in words or item.box_frac < 0.05  # tiny shapes blur
    assert not any(Path(e["image"]).stem.startswith("gen_") for e in load(tmp_path, "vqa_train"))
