"""VQA data in the original's format, its answer weights, the official accuracy and the result file.

Annotation files are JSON lists of `{"question_id", "image", "question", "answer": [...], "dataset":
"vqa" | "vg"}` (vqa_train.json, vqa_val.json, vg_qa.json; vqa_test.json without answers for the
evaluation server); `image` is relative to `vqa_root` or `vg_root` by `dataset`. `answer_list.json` is
the list of candidate answers ranked at evaluation.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from datasets.base import AnnotationError, Annotations, PathLike, file_list, image_path, open_image
from datasets.text import TOKENIZER_SETTINGS, pre_question, tokenize


def answer_weights(answers: str | list[str], source: str) -> tuple[list[str], list[float]]:
    """Distinct answers and their weights, as the original computes them.

    VQA: each distinct answer weighs (annotators who gave it) / (all annotators), in first-seen order.
    Visual Genome: one answer (a string, or a list of them), weight 0.5 each.
    """
    if source == "vg":
        return ([answers], [0.5]) if isinstance(answers, str) else (list(answers), [0.5] * len(answers))
    weights: dict[str, float] = {}
    for a in answers:
        weights[a] = weights.get(a, 0.0) + 1 / len(answers)
    return list(weights), list(weights.values())


class VQADataset(Dataset):
    """Training questions: (image, question, answers + eos, weights)."""

    def __init__(self, ann_files: PathLike | Sequence[PathLike], transform: Callable, vqa_root: PathLike = "",
                 vg_root: PathLike = "", eos: str = "[SEP]", max_ques_words: int = 30):
        self.ann = Annotations(ann_files)
        self.transform, self.eos, self.max_ques_words = transform, eos, max_ques_words
        self.roots = {"vqa": vqa_root, "vg": vg_root}

    def __len__(self) -> int:
        return len(self.ann)

    def source(self, index: int) -> str:
        source = self.ann[index].get("dataset", "vqa")
        if source not in self.roots:
            raise AnnotationError(f"{self.ann.where(index)}: dataset must be 'vqa' or 'vg', got {source!r}")
        return source

    def image(self, index: int) -> torch.Tensor:
        path = image_path(self.roots[self.source(index)], self.ann.field(index, "image"))
        return self.transform(open_image(path, where=self.ann.where(index)))

    def question(self, index: int) -> str:
        return pre_question(self.ann.field(index, "question"), self.max_ques_words)

    def __getitem__(self, index: int):
        answers = self.ann.field(index, "answer")
        if not answers:
            raise AnnotationError(f"{self.ann.where(index)}: no answer to train on")
        answers, weights = answer_weights(answers, self.source(index))
        return self.image(index), self.question(index), [a + self.eos for a in answers], weights


class VQAEvalDataset(VQADataset):
    """Test questions: (image, question, index); `answer_list` holds the candidates.

    ALBEF parity: test questions keep up to 50 words (training: `max_ques_words`, 30)."""

    def __init__(self, ann_files: PathLike | Sequence[PathLike], transform: Callable, answer_list: PathLike,
                 vqa_root: PathLike = "", vg_root: PathLike = "", max_ques_words: int = 50):
        super().__init__(ann_files, transform, vqa_root, vg_root, max_ques_words=max_ques_words)
        self.answer_list = read_answer_list(answer_list)

    def __getitem__(self, index: int):
        return self.image(index), self.question(index), index

    def question_id(self, index: int) -> int:
        return int(self.ann.field(index, "question_id"))

    def has_answers(self) -> bool:
        return all(entry.get("answer") for entry in self.ann.entries)


def read_answer_list(paths: PathLike | Sequence[PathLike]) -> list[str]:
    """The candidate answers: each file a non-empty JSON list of strings, concatenated in order."""
    answers = []
    for path in file_list(paths):
        try:
            with open(path, encoding="utf-8") as f:
                part = json.load(f)
        except (OSError, ValueError) as e:
            raise AnnotationError(f"answer list {os.fspath(path)}: {e}") from e
        if not isinstance(part, list) or not part or not all(isinstance(a, str) for a in part):
            raise AnnotationError(f"{os.fspath(path)}: expected a non-empty JSON list of answer strings")
        answers += part
    return answers


# ------------------------------------------------------------------------------------------- collate


def _collate_train(samples, tokenizer) -> dict[str, torch.Tensor]:
    images, questions, answers, weights = zip(*samples)
    question_ids, question_mask = tokenize(tokenizer, list(questions), **TOKENIZER_SETTINGS["pretrain"])
    answer_ids, answer_mask = tokenize(tokenizer, [a for group in answers for a in group],
                                       **TOKENIZER_SETTINGS["vqa_answers"])
    return {"image": torch.stack(images), "question_ids": question_ids, "question_mask": question_mask,
            "answer_ids": answer_ids, "answer_mask": answer_mask,
            "weights": torch.tensor([w for group in weights for w in group], dtype=torch.float32),
            "n": torch.tensor([len(group) for group in answers], dtype=torch.long)}


def collate_vqa_train(tokenizer) -> Callable:
    """Samples -> VQAModel.forward's arguments: questions truncated to 25 tokens (VQA.py training),
    each question's answers flat and in order ([CLS] answer [SEP] [PAD]..), `weights` [R], `n` [B]."""
    return functools.partial(_collate_train, tokenizer=tokenizer)


def _collate_eval(samples, tokenizer) -> dict[str, torch.Tensor]:
    images, questions, index = zip(*samples)
    question_ids, question_mask = tokenize(tokenizer, list(questions), **TOKENIZER_SETTINGS["longest"])
    return {"image": torch.stack(images), "question_ids": question_ids, "question_mask": question_mask,
            "index": torch.tensor(index, dtype=torch.long)}


def collate_vqa_eval(tokenizer) -> Callable:
    """Samples -> {"image", "question_ids", "question_mask", "index"}; questions padded, not truncated."""
    return functools.partial(_collate_eval, tokenizer=tokenizer)


def answer_tokens(tokenizer, answer_list: list[str], eos: str = "[SEP]") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [A, La] of the candidate list, each answer + eos, as VQA.py's evaluation."""
    return tokenize(tokenizer, [a + eos for a in answer_list], **TOKENIZER_SETTINGS["vqa_answers"])


# -------------------------------------------------------------------------------- official accuracy

# The standard VQA evaluation's answer normalisation (VQA API, vqaEval.py), written from its rules.
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
# Canonical contractions; the lookup maps their apostrophe-less spellings onto them: one apostrophe ->
# the word without it ("dont"); several -> each spelling missing exactly one ("couldnt've", "couldn'tve").
_CONTRACTIONS = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't
must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's
there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()


def _spellings(word: str) -> list[str]:
    cuts = [i for i, c in enumerate(word) if c == "'"]
    if len(cuts) == 1:
        return [word.replace("'", "")]
    return [word[:i] + word[i + 1:] for i in cuts]


_CONTRACTION_OF = {s: w for w in _CONTRACTIONS for s in _spellings(w)}
_CONTRACTION_OF["somebody'd"] = "somebodyd"  # the official table's own entry (reversed), kept as is


def process_punctuation(text: str) -> str:
    """Each punctuation mark is deleted where it touches a space (or the text has a digit,digit
    comma), else replaced by a space; periods are deleted unless a digit follows."""
    out = text
    delete = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if delete or p + " " in text or " " + p in text else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digit_article(text: str) -> str:
    """Lower-case words; number words -> digits; articles dropped; contractions restored."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTION_OF.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_score(prediction: str, human_answers: list[str]) -> float:
    """Accuracy of one prediction in [0, 1]: min(#humans who gave it / 3, 1), averaged over the
    leave-one-out subsets of the human answers (the 10 choose 9 subsets of VQA's ten).

    As the official code, the prediction is fully normalised and the human answers only have their
    punctuation processed, and only when they disagree. A question with a single reference answer (VG,
    the demo data) has no subset to average over: it scores 1 for an exact (normalised) match.
    """
    pred = normalize_answer(prediction)
    if len(set(human_answers)) > 1:
        human_answers = [process_punctuation(a) for a in human_answers]
    if len(human_answers) == 1:
        return float(pred == human_answers[0])
    matches = sum(a == pred for a in human_answers)
    # leaving out a matching answer leaves matches - 1 in the subset, any other leaves matches
    per_subset = [min(1.0, (matches - (a == pred)) / 3) for a in human_answers]
    return sum(per_subset) / len(per_subset)


def vqa_accuracy(result: list[dict], entries: Sequence[dict]) -> dict[str, float]:
    """{"overall": accuracy in percent} of a result file's rows on the annotation entries (matched by
    question_id; every entry needs a prediction), plus "<answer_type>" accuracies where entries carry
    an `answer_type` (VQA v2's yes/no, number, other)."""
    predicted = {int(r["question_id"]): r["answer"] for r in result}
    scores: dict[str, list[float]] = {"overall": []}
    for entry in entries:
        qid = int(entry["question_id"])
        if qid not in predicted:
            raise KeyError(f"no prediction for question_id {qid}")
        score = vqa_score(predicted[qid], list(entry["answer"]))
        scores["overall"].append(score)
        if "answer_type" in entry:
            scores.setdefault(entry["answer_type"], []).append(score)
    return {k: 100.0 * sum(v) / len(v) for k, v in scores.items() if v}


def write_result_file(result: list[dict], path: PathLike) -> None:
    """The evaluation server's format: a JSON list of {"question_id": int, "answer": str}."""
    rows = [{"question_id": int(r["question_id"]), "answer": str(r["answer"])} for r in result]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump(rows, f)
    os.replace(f"{path}.tmp", path)
