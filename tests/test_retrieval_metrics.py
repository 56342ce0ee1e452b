"""The recall metric on hand-made score matrices (several captions per image, ties)."""

import numpy as np
import pytest

from datasets.retrieval import index_captions, recall_metrics


def test_index_captions():
    texts, img2txt, txt2img = index_captions([{"image": "a", "caption": ["x", "y"]}, {"image": "b", "caption": "z"}])
    assert texts == ["x", "y", "z"] and img2txt == [[0, 1], [2]] and txt2img == [0, 0, 1]


def test_recall_with_several_captions_per_image():
    # 3 images, 2 captions each: texts 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2
    txt2img = [0, 0, 1, 1, 2, 2]
    img2txt = [[0, 1], [2, 3], [4, 5]]
    i2t = np.array([
        [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # image 0: its 2nd caption is top -> rank 0
        [0.9, 0.0, 0.1, 0.8, 0.0, 0.0],  # image 1: best gt caption (3) at rank 1
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.0],  # image 2: best gt caption (4) at rank 4
    ])
    t2i = i2t.T.copy()  # text t scores images by the same numbers
    m = recall_metrics(i2t, t2i, txt2img, img2txt)
    assert m["txt_r1"] == pytest.approx(100 / 3) and m["txt_r5"] == 100 and m["txt_r10"] == 100
    # text ranks: t0 -> img0 score .1 vs .9,.9 -> rank 2 (ties among others do not matter), t1 -> rank 0,
    # t2 -> img1 .1 vs 0,.7 -> rank 1, t3 -> img1 .8 vs 0,.6 -> rank 0, t4 -> img2 .5 vs 0,0 -> 0, t5 -> 0 vs 0,0 tie
    ranks = []
    for t, s in enumerate(t2i):
        order = np.argsort(s)[::-1]
        ranks.append(int(np.where(order == txt2img[t])[0][0]))
    assert ranks[:5] == [2, 0, 1, 0, 0]
    expected_r1 = 100 * np.mean(np.array(ranks) < 1)
    assert m["img_r1"] == pytest.approx(expected_r1)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)


def test_ties_resolve_as_numpy_argsort_reversed():
    # all scores equal: the original's reversed quicksort puts the LAST index first
    s = np.zeros((1, 4))
    m = recall_metrics(s, np.zeros((4, 1)), [0, 0, 0, 0], [[3]])
    assert m["txt_r1"] == 100.0
    m = recall_metrics(s, np.zeros((4, 1)), [0, 0, 0, 0], [[0]])
    assert m["txt_r1"] == 0.0 and m["txt_r5"] == 100.0
