"""Classification metrics against hand-computed values on a 3-class, 8-sample example."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from sslcell.errors import InputError
from sslcell.metrics import ClassificationReport, classification_report, plot_confusion_matrix, plot_roc_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# rows = true a, b, c; cols = predicted a, b, c
Y_TRUE = ["a", "a", "a", "b", "b", "b", "c", "c"]
Y_PRED = ["a", "a", "b", "b", "b", "c", "c", "c"]
CONFUSION = [[2, 1, 0], [0, 2, 1], [0, 0, 2]]
# recall a 2/3, b 2/3, c 1; precision a 1, b 2/3, c 2/3; F1 a 0.8, b 2/3, c 0.8
ACCURACY = 6 / 8
BALANCED = (2 / 3 + 2 / 3 + 1) / 3
MACRO_F1 = (0.8 + 2 / 3 + 0.8) / 3
SCORES = np.array(
    [  # a     b     c
        [0.90, 0.10, 0.00],
        [0.80, 0.10, 0.10],
        [0.30, 0.60, 0.10],
        [0.40, 0.50, 0.10],
        [0.30, 0.60, 0.10],
        [0.10, 0.80, 0.10],
        [0.35, 0.20, 0.45],
        [0.05, 0.30, 0.65],
    ]
)
# AUC = P(score of a positive > score of a negative), ties count 1/2:
# a: positives .9 .8 .3 vs negatives .4 .3 .1 .35 .05 -> (5 + 5 + 2.5) / 15
# b: positives .5 .6 .8 vs negatives .1 .1 .6 .2 .3 -> (4 + 4.5 + 5) / 15
# c: positives .45 .65 above every negative -> 1
AUC = {"a": 12.5 / 15, "b": 13.5 / 15, "c": 1.0}


@pytest.fixture
def report() -> ClassificationReport:
    return classification_report(Y_TRUE, Y_PRED, SCORES, classes=["a", "b", "c"])


def test_scores_match_hand_computed_values(report):
    assert report.classes == ["a", "b", "c"]
    assert report.n == 8
    assert report.accuracy == pytest.approx(ACCURACY)
    assert report.balanced_accuracy == pytest.approx(BALANCED)
    assert report.macro_f1 == pytest.approx(MACRO_F1)
    assert report.confusion.dtype == np.int64
    np.testing.assert_array_equal(report.confusion, CONFUSION)
    assert report.roc_auc == pytest.approx(AUC)
    assert report.macro_roc_auc == pytest.approx(np.mean(list(AUC.values())))
    expected = pd.DataFrame(
        {"precision": [1, 2 / 3, 2 / 3], "recall": [2 / 3, 2 / 3, 1], "f1": [0.8, 2 / 3, 0.8], "support": [3, 3, 2]},
        index=["a", "b", "c"],
    )
    pd.testing.assert_frame_equal(report.per_class, expected, check_names=False, check_dtype=False)


def test_classes_order_follows_the_given_order():
    r = classification_report(Y_TRUE, Y_PRED, SCORES[:, ::-1], classes=["c", "b", "a"])
    np.testing.assert_array_equal(r.confusion, np.array(CONFUSION)[::-1, ::-1])
    assert list(r.per_class.index) == ["c", "b", "a"]
    assert r.roc_auc == pytest.approx(AUC)


def test_without_scores_auc_is_nan_and_classes_default_to_sorted_union():
    r = classification_report(Y_TRUE[::-1], Y_PRED[::-1])
    assert r.classes == ["a", "b", "c"]
    np.testing.assert_array_equal(r.confusion, CONFUSION)
    assert all(math.isnan(v) for v in r.roc_auc.values())
    assert math.isnan(r.macro_roc_auc)
    assert r.to_dict()["macro_roc_auc"] is None


def test_absent_class_has_nan_auc_and_none_in_dict(tmp_path):
    scores = np.column_stack([SCORES, np.full(8, 0.2)])
    r = classification_report(Y_TRUE, Y_PRED, scores, classes=["a", "b", "c", "d"])
    assert math.isnan(r.roc_auc["d"])
    assert r.roc_auc["a"] == pytest.approx(AUC["a"])
    assert r.macro_roc_auc == pytest.approx(np.mean(list(AUC.values())))  # the nan is left out of the mean
    assert r.balanced_accuracy == pytest.approx(BALANCED)  # mean recall over classes present in y_true
    assert r.macro_f1 == pytest.approx((0.8 + 2 / 3 + 0.8) / 3)  # a listed class never true nor predicted: left out
    from sklearn.metrics import f1_score

    assert r.macro_f1 == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="macro"))
    predicted_only = classification_report(["a", "a", "b"], ["a", "d", "b"], classes=["a", "b", "d"])
    assert predicted_only.macro_f1 == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)  # predicted, never true: F1 0
    assert r.confusion.shape == (4, 4) and r.confusion[3].sum() == 0 and r.confusion[:, 3].sum() == 0

    d = r.to_dict()
    assert d["roc_auc"]["d"] is None
    assert d["roc_auc"]["a"] == pytest.approx(AUC["a"])
    assert d["confusion"][0] == [2, 1, 0, 0]
    assert d["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    r.to_json(tmp_path / "report.json")
    loaded = json.loads((tmp_path / "report.json").read_text())  # strict JSON: null, not NaN
    assert "NaN" not in (tmp_path / "report.json").read_text()
    assert loaded == json.loads(json.dumps(d))

    back = ClassificationReport.from_dict(loaded)  # the round trip: nan again where the JSON has null
    assert math.isnan(back.roc_auc["d"]) and back.macro_roc_auc == r.macro_roc_auc and back.to_dict() == d
    pd.testing.assert_frame_equal(back.per_class, r.per_class)
    np.testing.assert_array_equal(back.confusion, r.confusion)


def test_single_class_in_y_true_has_nan_auc():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided before sklearn, which would warn
        r = classification_report(["a"] * 4, ["a", "b", "a", "a"], np.eye(2)[[0, 1, 0, 0]], classes=["a", "b"])
    assert math.isnan(r.roc_auc["a"]) and math.isnan(r.roc_auc["b"]) and math.isnan(r.macro_roc_auc)
    assert r.accuracy == pytest.approx(0.75)
    assert r.balanced_accuracy == pytest.approx(0.75)


def test_predicted_class_absent_from_y_true_is_left_out_of_balanced_accuracy():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = classification_report(["a", "a", "b", "b"], ["a", "x", "b", "b"])
    assert r.classes == ["a", "b", "x"]
    assert r.balanced_accuracy == pytest.approx((1 / 2 + 1) / 2)


def test_ints_and_strings_compare_as_strings():
    ints = [0, 0, 0, 1, 1, 1, 2, 2]
    preds = ["0", "0", "1", "1", "1", "2", "2", "2"]
    r = classification_report(np.array(ints), preds, SCORES, classes=[0, 1, 2])
    assert r.classes == ["0", "1", "2"]
    assert r.accuracy == pytest.approx(ACCURACY)
    np.testing.assert_array_equal(r.confusion, CONFUSION)
    assert r.roc_auc == pytest.approx({"0": AUC["a"], "1": AUC["b"], "2": AUC["c"]})


def test_default_order_is_numeric_for_numbers_and_categoricals_are_accepted():
    r = classification_report([10, 2, 1], [2, 10, 1])
    assert r.classes == ["1", "2", "10"]
    r = classification_report(pd.Categorical(Y_TRUE), pd.Series(Y_PRED, dtype="category"))
    assert r.accuracy == pytest.approx(ACCURACY)
    np.testing.assert_array_equal(r.confusion, CONFUSION)


def test_to_markdown_contains_the_numbers(report):
    md = report.to_markdown(title="Probe on test cells")
    assert md.startswith("## Probe on test cells")
    for value in (ACCURACY, MACRO_F1, BALANCED, np.mean(list(AUC.values())), *AUC.values()):
        assert f"{value:.3f}" in md
    assert "| a | 1.000 | 0.667 | 0.800 | 0.833 | 3 |" in md
    md = classification_report(Y_TRUE, Y_PRED).to_markdown()
    assert "n/a" in md and "nan" not in md


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"y_true": Y_TRUE, "y_pred": Y_PRED[:7]}, r"8.*7"),
        ({"y_true": Y_TRUE, "y_pred": Y_PRED, "scores": SCORES}, "classes must be given"),
        ({"y_true": Y_TRUE, "y_pred": Y_PRED, "classes": ["a", "b"]}, r"not in classes: \['c'\]"),
        ({"y_true": Y_TRUE, "y_pred": ["zz"] + Y_PRED[1:], "classes": ["a", "b", "c"]}, r"y_pred.*'zz'"),
        ({"y_true": [], "y_pred": []}, "empty"),
        ({"y_true": Y_TRUE, "y_pred": Y_PRED, "scores": SCORES[:, :2], "classes": "abc"}, r"\(8, 3\).*\(8, 2\)"),
        ({"y_true": ["a", None, "b"], "y_pred": ["a", "b", "b"]}, "missing"),
        ({"y_true": Y_TRUE, "y_pred": Y_PRED, "classes": ["a", "b", "c", "a"]}, "duplicates"),
    ],
)
def test_bad_input_raises_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        classification_report(**kwargs)


def test_nan_scores_raise_input_error():
    scores = SCORES.copy()
    scores[5, 1] = np.nan
    with pytest.raises(InputError, match=r"NaN.*row 5, column 1 = 'b'"):
        classification_report(Y_TRUE, Y_PRED, scores, classes=["a", "b", "c"])


def test_confusion_matrix_plot_writes_png(report, tmp_path):
    for normalize in (True, False):
        path = tmp_path / "plots" / f"confusion_{normalize}.png"
        out = plot_confusion_matrix(report, path, normalize=normalize, title="test")
        assert out == path
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_confusion_matrix_of_something_else_than_a_report_is_refused():
    import anndata as ad

    from sslcell import pl
    from sslcell.errors import InputError

    with pytest.raises(InputError, match="a ClassificationReport .*got AnnData"):
        pl.confusion_matrix(ad.AnnData(np.zeros((2, 2))))


def test_roc_plot_writes_png_and_checks_input(tmp_path):
    path = tmp_path / "roc.png"
    assert plot_roc_curves(Y_TRUE, SCORES, ["a", "b", "c"], str(path)) == path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    with pytest.raises(InputError, match="single class"):
        plot_roc_curves(["a"] * 3, np.ones((3, 2)), ["a", "b"], tmp_path / "x.png")
    with pytest.raises(InputError, match=r"not in classes: \['c'\]"):
        plot_roc_curves(Y_TRUE, SCORES[:, :2], ["a", "b"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
