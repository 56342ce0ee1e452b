"""Imports only go down: task scripts and tools (scripts/) -> what they share (task_configs, zero_shot) ->
engine (utils, checkpoints, config, optim, metrics, memory, classify) -> models/, datasets/.

`models/` and `datasets/` import nothing from each other, the engine or the scripts (a type they share
lives in the lower module: `DistInfo` in datasets/loaders.py, checkpoint reading in models/checkpoint.py).
The engine imports from them only what it runs on: the loaders it positions, the checkpoint format,
and the error types it reports in one line. Nothing imports a task script or a tool in scripts/: a tool
runs a task script as a process and reads what it wrote. Every import in the project's .py files is
parsed (inside functions and `if TYPE_CHECKING:` too).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK_SCRIPTS = {"Pretrain", "Pretrain_nlvr", "Retrieval", "VQA", "NLVR", "VE", "Grounding"}
SHARED = {"task_configs", "zero_shot"}  # the task scripts' schemas and measures that tools read too
ENGINE = {"utils", "checkpoints", "config", "optim", "metrics", "memory", "classify"}
PACKAGES = {"models", "datasets", "scripts"}
# What the engine may take from the packages below it: whole modules, or error types by name.
ENGINE_MODULES = {"datasets.loaders", "models.checkpoint"}
ENGINE_ERRORS = {"datasets.base": {"AnnotationError", "ImageLoadError"}, "datasets.shards": {"ShardError"},
                 "models.bert": {"PretrainedNotFound"}}


def project_files() -> list[Path]:
    files = [p for p in ROOT.glob("*.py")]
    for folder in ("models", "datasets", "scripts"):
        files += sorted((ROOT / folder).glob("*.py"))
    return files


def imports(path: Path) -> list[tuple[str, set[str]]]:
    """(module, names) of every import in `path`; `import a.b` gives ("a.b", set())."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, set()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in PACKAGES:
            out += [(f"{node.module}.{alias.name}", set()) for alias in node.names]  # `from models import vqa`
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, {alias.name for alias in node.names}))
    return out


def forbidden(rel: str, module: str, names: set[str]) -> str | None:
    """Why `rel` may not import `names` from `module`; None when it may."""
    top, layer = module.split(".")[0], rel.split("/")[0] if "/" in rel else Path(rel).stem
    if top in TASK_SCRIPTS or top == "scripts":
        return f"imports {module}: nothing imports a task script or a tool"
    if top in SHARED and (layer in ENGINE or layer in ("models", "datasets")):
        return f"imports {module}: the engine and the packages below it know no task"
    if layer in ("models", "datasets"):
        below = "models" if layer == "models" else "datasets"
        if top in ENGINE or (top in ("models", "datasets") and top != below):
            return f"imports {module}: {layer}/ imports only from itself, torch and libraries"
    if layer in ENGINE and top in ("models", "datasets") and module not in ENGINE_MODULES:
        extra = names - ENGINE_ERRORS.get(module, set())
        if extra or not names:
            return f"imports {module} ({', '.join(sorted(extra)) or 'the module'}): the engine takes only " \
                   f"{sorted(ENGINE_MODULES)} and error types from below"
    return None


def test_imports_only_go_down():
    bad = []
    for path in project_files():
        rel = path.relative_to(ROOT).as_posix()
        for module, names in imports(path):
            if (why := forbidden(rel, module, names)) is not None:
                bad.append(f"{rel} {why}")
    assert not bad, "\n".join(bad)


def test_the_rules_catch_each_kind_of_edge():
    assert forbidden("datasets/loaders.py", "utils", {"DistInfo"})
    assert forbidden("datasets/retrieval.py", "models.retrieval", {"rerank_itm"})
    assert forbidden("models/albef.py", "datasets.text", {"tokenize"})
    assert forbidden("models/vqa.py", "checkpoints", set())
    assert forbidden("utils.py", "models.albef", {"ALBEF"})
    assert forbidden("utils.py", "datasets.base", {"Annotations"})
    assert forbidden("Retrieval.py", "Pretrain", {"PretrainConfig"})
    assert forbidden("scripts/visualize.py", "scripts.score_pairs", {"score"})
    assert forbidden("scripts/ablate_vilta.py", "Pretrain", set())
    assert forbidden("utils.py", "task_configs", {"PretrainConfig"})
    assert forbidden("models/retrieval.py", "zero_shot", {"K_TEST"})
    assert forbidden("scripts/demo.py", "zero_shot", {"measure"}) is None
    assert forbidden("Pretrain.py", "task_configs", {"PretrainConfig"}) is None
    assert forbidden("models/vqa.py", "models.albef", set()) is None
    assert forbidden("utils.py", "models.checkpoint", {"ChecksumError"}) is None
    assert forbidden("utils.py", "datasets.shards", {"ShardError"}) is None
    assert forbidden("Retrieval.py", "models.retrieval", {"ALBEFRetrieval"}) is None

