"""Text normalisation and tokenisation against the original's outputs (text_preprocessing.json,
tokenizer.json of the reference fixtures, real bert-base-uncased vocabulary). Cases, settings and
expected outputs all come from the fixture set (ALBEF_REF_DIR or tests/fixtures/albef_ref)."""

import hashlib
import json

import pytest
import torch

from datasets.text import MAX_TOKENS, TOKENIZER_SETTINGS, build_tokenizer, pre_caption, pre_question, tokenize


@pytest.fixture(scope="module")
def tok_ref(ref_dir) -> dict:
    return json.loads((ref_dir / "tokenizer.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(bert_vocab_dir):
    return build_tokenizer(bert_vocab_dir)


def test_text_preprocessing_matches_original(ref_dir):
    cases = json.loads((ref_dir / "text_preprocessing.json").read_text())
    fns = {"pre_caption": pre_caption, "pre_question": pre_question}
    assert {c["fn"] for c in cases} == set(fns)
    wrong = [c for c in cases if fns[c["fn"]](c["input"], c["max_words"]) != c["output"]]
    assert not wrong, wrong


def test_packaged_vocab_is_the_fixture_vocab(bert_vocab_dir, tok_ref):
    md5 = hashlib.md5((bert_vocab_dir / "vocab.txt").read_bytes()).hexdigest()
    assert md5 in tok_ref["vocab"]


def test_settings_mirror_the_fixture(tok_ref):
    assert {c["setting"]: c["kwargs"] for c in tok_ref["cases"]} == TOKENIZER_SETTINGS


def test_wordpiece_tokens(tokenizer, tok_ref):
    for t in tok_ref["tokens"]:
        assert tokenizer.tokenize(t["text"]) == t["albef_tokens"], t["text"]


def test_special_ids(tokenizer, tok_ref):
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in tok_ref["special_ids"]} == tok_ref["special_ids"]


@pytest.mark.parametrize("setting", list(TOKENIZER_SETTINGS))
def test_tokenize_matches_original(tokenizer, tok_ref, setting):
    case = next(c for c in tok_ref["cases"] if c["setting"] == setting)
    input_ids, attention_mask = tokenize(tokenizer, case["texts"], **case["kwargs"])
    assert input_ids.dtype == attention_mask.dtype == torch.int64
    assert input_ids.tolist() == case["albef"]["input_ids"]
    assert attention_mask.tolist() == case["albef"]["attention_mask"]


def test_no_final_sep_and_truncation_counts_cls(tokenizer):
    ids, mask = tokenize(tokenizer, ["a b c d e f"], truncation=True, max_length=4)
    assert ids.tolist() == [[101, 1037, 1038, 1039]] and mask.tolist() == [[1, 1, 1, 1]]
    ids, _ = tokenize(tokenizer, ["yes[SEP]", "a"])
    assert ids.tolist() == [[101, 2748, 102], [101, 1037, 0]]


def test_direct_call_also_has_no_final_sep(tokenizer):
    # Code that calls the tokenizer itself gets the same ids as `tokenize`.
    assert tokenizer("a man")["input_ids"] == [101, 1037, 2158]


def test_standard_bert_tokenizer_is_refused(bert_vocab_dir):
    from transformers import BertTokenizerFast

    with pytest.raises(ValueError, match="build_tokenizer"):
        tokenize(BertTokenizerFast.from_pretrained(str(bert_vocab_dir)), ["a man"])


@pytest.mark.parametrize("setting", ["retrieval_train", "longest", "vqa_answers"])
def test_a_text_longer_than_bert_positions_is_cut_there(tokenizer, setting):
    """Settings without truncation (ALBEF parity) still never exceed the 512 positions: 30 words of 100
    word pieces each (`max_words` counts words) used to crash in BERT's position embedding."""
    ids, mask = tokenize(tokenizer, [pre_caption(" ".join(["x1" * 50] * 40), 30), "a dog"],
                         **TOKENIZER_SETTINGS[setting])
    assert ids.shape == (2, MAX_TOKENS) and mask[1].sum() == 3
