"""Text as the original ALBEF scripts feed it: caption/question normalisation and tokenisation.

Both functions reproduce the original character for character (checked against the reference
fixture), because the text an ALBEF checkpoint was trained on is what these functions produce.
`collate_image_text` is the one-image tasks' batch: images stacked, texts tokenised as their script.
"""

from __future__ import annotations

import os
import re

import torch
from tokenizers.processors import TemplateProcessing
from transformers import BertTokenizerFast

# Characters the original deletes from captions and questions (its regex class `[,.'!?"()*#:;~]`).
_DROPPED = ",.'!?\"()*#:;~"
_NORMALISE = str.maketrans({**{c: None for c in _DROPPED}, "-": " ", "/": " "})
_WHITESPACE_RUN = re.compile(r"\s{2,}")

# BERT's position embeddings: no setting returns longer token sequences (see `tokenize`).
MAX_TOKENS = 512

# The tokenizer call of each original script, keyed by the fixture's setting names.
TOKENIZER_SETTINGS: dict[str, dict] = {
    # Pretrain.py, Pretrain_nlvr.py; VQA.py training questions.
    "pretrain": {"padding": "longest", "truncation": True, "max_length": 25},
    # Retrieval.py and Grounding.py training.
    # ALBEF parity: max_length without truncation does nothing; captions of any length pass.
    "retrieval_train": {"padding": "longest", "max_length": 30},
    # Retrieval.py evaluation: every text padded or cut to exactly 30 tokens.
    "retrieval_eval": {"padding": "max_length", "truncation": True, "max_length": 30},
    # NLVR.py, VE.py (train and eval), VQA.py evaluation questions, Grounding.py evaluation.
    "longest": {"padding": "longest"},
    # VQA.py answers, each given the suffix "[SEP]" (config `eos`) before tokenisation.
    "vqa_answers": {"padding": "longest"},
}


def _truncate_words(text: str, max_words: int) -> str:
    # ALBEF parity: words are split on single spaces only, so a lone "\n" or "\t" stays inside a word.
    return " ".join(text.split(" ")[:max_words])


def pre_caption(caption: str, max_words: int) -> str:
    """Lower-case, drop `,.'!?"()*#:;~`, turn `-` and `/` into spaces, `<person>` into `person`,
    squeeze whitespace runs of 2+ into one space, strip, keep the first `max_words` words."""
    caption = caption.lower().translate(_NORMALISE).replace("<person>", "person")
    caption = _WHITESPACE_RUN.sub(" ", caption)
    # ALBEF parity: strips trailing newlines, then spaces (a lone newline can survive inside).
    caption = caption.rstrip("\n").strip(" ")
    return _truncate_words(caption, max_words)


def pre_question(question: str, max_ques_words: int) -> str:
    """Like `pre_caption` but, as in the original, without squeezing whitespace, without the
    `<person>` rule, and stripping only trailing spaces (leading spaces and newlines stay)."""
    question = question.lower().translate(_NORMALISE).rstrip(" ")
    return _truncate_words(question, max_ques_words)


def build_tokenizer(name_or_path: str | os.PathLike) -> BertTokenizerFast:
    """A BERT WordPiece tokenizer that, like the original's, puts [CLS] before a single text and no
    [SEP] after it.

    `name_or_path`: a local folder with the tokenizer files (`vocab.txt` is enough; the original uses
    bert-base-uncased) or a hub name such as "bert-base-uncased".
    """
    tokenizer = BertTokenizerFast.from_pretrained(os.fspath(name_or_path))
    # A packaged tokenizer.json may carry preset padding/truncation (sentence-transformers folders do);
    # only the arguments of each call should count.
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    # `tokenize` never returns more tokens than BERT has positions, whatever the settings.
    tokenizer.model_max_length = min(tokenizer.model_max_length, MAX_TOKENS)
    cls, sep = tokenizer.cls_token, tokenizer.sep_token
    # ALBEF parity: the original tokenizer class never appends [SEP] to a single text;
    # truncation to max_length then keeps max_length tokens including [CLS]. Pairs are unchanged.
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{cls} $A",
        pair=f"{cls} $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.cls_token_id), (sep, tokenizer.sep_token_id)],
    )
    return tokenizer


def tokenize(
    tokenizer: BertTokenizerFast,
    texts: list[str],
    *,
    padding: bool | str = "longest",
    truncation: bool = False,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both int64 [B, L]: `[CLS] tokens [PAD]...`, as the original.

    The keyword arguments are those of the original scripts (see `TOKENIZER_SETTINGS`); a literal
    "[SEP]" inside a text becomes id 102 (VQA answers). `tokenizer` must come from `build_tokenizer`.
    Not the original: without `truncation`, texts are still cut at `tokenizer.model_max_length` (at most
    MAX_TOKENS), where the original crashed in BERT's position embedding.
    """
    if tokenizer.num_special_tokens_to_add(pair=False) != 1:
        raise ValueError("tokenizer appends [SEP] to single texts; use datasets.text.build_tokenizer")
    if not truncation:  # a text the model cannot embed (one 3000-letter "word") is cut at its positions
        truncation, max_length = True, tokenizer.model_max_length
    enc = tokenizer(
        list(texts),
        padding=padding,
        truncation=truncation,
        max_length=max_length,
        return_token_type_ids=False,
        return_tensors="pt",
    )
    return enc["input_ids"].long(), enc["attention_mask"].long()


def collate_image_text(samples: list[tuple], tokenizer: BertTokenizerFast, *, setting: str,
                       key: str | None = None) -> dict[str, torch.Tensor]:
    """(image, text[, int]) samples -> {"image" [B,3,H,W], "input_ids", "attention_mask" [B,L]} with the
    texts tokenised by `TOKENIZER_SETTINGS[setting]`, and with `key` the samples' third items as int64
    [B] under that name. Used through `functools.partial` (picklable for loader workers)."""
    images, texts = zip(*((s[0], s[1]) for s in samples))
    input_ids, attention_mask = tokenize(tokenizer, list(texts), **TOKENIZER_SETTINGS[setting])
    batch = {"image": torch.stack(images), "input_ids": input_ids, "attention_mask": attention_mask}
    if key is not None:
        batch[key] = torch.tensor([s[2] for s in samples], dtype=torch.long)
    return batch
