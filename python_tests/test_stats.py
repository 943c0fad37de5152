"""Sample-efficiency statistics and weight diagnostics on synthetic curves with known answers."""
import math

import numpy as np
import pytest

from varweight_kernels.experiments import stats as st

STEPS = [0, 100, 200, 400]


def test_auc_is_the_mean_score_of_the_linear_curve():
    # trapezoids: (10+6)/2*100 + (6+4)/2*100 + (4+2)/2*200 = 800 + 500 + 600 = 1900 over 400 steps
    assert st.curve_auc(STEPS, [10, 6, 4, 2]) == pytest.approx(4.75)
    assert st.curve_auc(STEPS, [3, 3, 3, 3]) == pytest.approx(3.0)
    # shifting the steps does not change it; uneven spacing is weighted by the interval
    assert st.curve_auc([1000, 1100, 1200, 1400], [10, 6, 4, 2]) == pytest.approx(4.75)
    assert st.curve_auc([0, 300, 400], [4, 4, 0]) == pytest.approx((1200 + 200) / 400)
    with pytest.raises(ValueError, match="at least 2"):
        st.curve_auc([100], [1.0])
    with pytest.raises(ValueError, match="increase"):
        st.curve_auc([0, 100, 100], [1.0, 2.0, 3.0])


def test_crossing_is_interpolated_between_evaluations():
    # 6 at step 100, 4 at step 200: 5 is reached half way, 4.5 three quarters of the way
    assert st.steps_to_threshold(STEPS, [10, 6, 4, 2], 5.0) == st.Crossing(150.0, False)
    assert st.steps_to_threshold(STEPS, [10, 6, 4, 2], 4.5) == st.Crossing(175.0, False)
    # exactly on an evaluation: that step; from 4 at 200 to 2 at 400, 3 is at 300
    assert st.steps_to_threshold(STEPS, [10, 6, 4, 2], 6.0) == st.Crossing(100.0, False)
    assert st.steps_to_threshold(STEPS, [10, 6, 4, 2], 3.0) == st.Crossing(300.0, False)
    # the first time counts, not a later dip
    assert st.steps_to_threshold(STEPS, [10, 4, 8, 2], 5.0).step == pytest.approx(100 * 5 / 6)
    # already below at the first evaluation
    assert st.steps_to_threshold(STEPS, [1, 6, 4, 2], 5.0) == st.Crossing(0.0, False)


def test_never_reaching_the_threshold_is_censored_at_the_last_step():
    c = st.steps_to_threshold(STEPS, [10, 6, 4, 2], 1.0)
    assert c == st.Crossing(400.0, True) and c.text() == ">400"
    assert st.Crossing(150.0, False).text() == "150"


def test_baseline_threshold_is_the_mean_score_at_mid_training():
    curves = {"a": (np.array(STEPS), np.array([10.0, 6, 4, 2])), "b": (np.array(STEPS), np.array([12.0, 8, 6, 2]))}
    thr, mid = st.baseline_threshold(curves)
    assert mid == 200.0 and thr == pytest.approx(5.0)  # mean of 4 and 6 at step 200
    # a mid point between evaluations is interpolated: mean curve 4, 3 at steps 100, 300 -> 3.5 at 200
    odd = {"a": (np.array([100, 300]), np.array([4.0, 3.0]))}
    assert st.baseline_threshold(odd) == (pytest.approx(3.5), 200.0)


def test_mismatched_evaluation_steps_are_refused_with_the_steps_named():
    curves = {"uniform/seed0": (np.array([100, 200, 300]), np.zeros(3)),
              "vaw/seed1": (np.array([100, 250, 300]), np.zeros(3))}
    with pytest.raises(ValueError) as err:
        st.require_same_eval_steps(curves)
    msg = str(err.value)
    assert "evaluation steps differ" in msg and "vaw/seed1" in msg and "uniform/seed0" in msg
    assert "steps 250 not in uniform/seed0" in msg and "steps 200 not in vaw/seed1" in msg
    with pytest.raises(ValueError, match="evaluation steps differ"):
        st.baseline_threshold(curves)
    same = {"x": (np.array([1, 2]), np.zeros(2)), "y": (np.array([1, 2]), np.ones(2))}
    assert st.require_same_eval_steps(same).tolist() == [1, 2]


def test_paired_crossings_with_censored_seeds():
    C = st.Crossing
    method = {0: C(100.0, False), 1: C(150.0, False), 2: C(400.0, True), 3: C(400.0, True), 4: C(120.0, False)}
    base = {0: C(200.0, False), 1: C(220.0, False), 2: C(300.0, False), 3: C(400.0, True), 4: C(400.0, True)}
    c = st.paired_crossing_comparison(method, base, "vaw", "uniform")
    # seed 3: neither crossed -> left out; 2 and 4 enter at the last step (bounds)
    assert c.neither == [3] and c.method_censored == [2] and c.baseline_censored == [4]
    assert c.result.seeds == [0, 1, 2, 4]
    assert c.result.diffs == pytest.approx([-100.0, -70.0, 100.0, -280.0])
    assert c.result.mean_diff == pytest.approx(-87.5) and c.result.wins == 3
    text = st.describe_crossing(c)
    assert "steps-to-threshold" in text and "bounds towards 0" in text and "seed(s) 3 left out" in text
    none = st.paired_crossing_comparison({0: C(400.0, True)}, {0: C(400.0, True)}, "vaw", "uniform")
    assert none.result.n == 0 and "neither reached the threshold" in st.describe_crossing(none)
    clean = st.paired_crossing_comparison({0: C(1.0, False), 1: C(2.0, False)}, {0: C(3.0, False), 1: C(5.0, False)})
    assert "bounds" not in st.describe_crossing(clean) and clean.result.mean_diff == pytest.approx(-2.5)


def test_effective_sample_fraction():
    # one sample at weight 1, one at 3: (1 + 3)^2 / (2 * (1 + 9)) = 0.8
    assert st.effective_sample_fraction([1, 1], [1.0, 3.0]) == pytest.approx(0.8)
    # equal weights use the whole batch, whatever the weight
    assert st.effective_sample_fraction([5, 3, 2], [2.0, 2.0, 2.0]) == pytest.approx(1.0)
    # all weight on 3 of 4 samples: 3/4 of the batch is used
    assert st.effective_sample_fraction([3, 1], [1.0, 0.0]) == pytest.approx(0.75)
    # per row of a (T, K) history; an empty row has none
    rows = st.effective_sample_fraction(np.array([[1, 1], [0, 0]]), np.array([[1.0, 3.0], [1.0, 1.0]]))
    assert rows[0] == pytest.approx(0.8) and math.isnan(rows[1])


def test_weight_ranges_name_the_lam_ranges_a_weighting_favours():
    edges = [-6, -4, -2, 0, 2, 4, 6]
    w = [0.5, 0.7, 1.02, 2.0, 3.0, 0.2]
    r = st.weight_ranges(edges, w, [True] * 6)
    assert r["up"] == [(0.0, 4.0, pytest.approx(2.5))]  # bins [0,2) and [2,4)
    assert r["down"] == [(-6.0, -2.0, pytest.approx(0.6)), (4.0, 6.0, pytest.approx(0.2))]
    # 1.02 is within the tolerance; an unused bin splits a run and is never reported
    r = st.weight_ranges(edges, w, [True, False, True, True, True, True])
    assert r["down"][0] == (-6.0, -4.0, pytest.approx(0.5))
    assert st.weight_ranges(edges, [1.0] * 6, [True] * 6) == {"up": [], "down": []}
