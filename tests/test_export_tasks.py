"""Export round trip, task sampling and the disjoint meta-train / meta-test split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaplastic._errors import MetaplasticError
from metaplastic.export._export import (
    RULE_JSON_VERSION,
    equations,
    format_rule,
    rule_from_json,
    rule_to_json,
)
from metaplastic.rules._rules import TermPoolRule
from metaplastic.tasks._classification import ClassificationTask
from metaplastic.tasks._data import split_pools


def test_json_round_trip_and_pruning():
    rule = TermPoolRule.from_names(
        ["pseudo_gradient", "error_hebbian", "oja"], [0.0812345, -0.12, 2e-5]
    )
    data = rule_to_json(rule, threshold=1e-4)
    assert data["pruned"] == ["oja"]
    assert data["equation"] == "dW = 0.12*e*e_pre.T - 0.08123*e*x.T"
    assert data["latex"].startswith(r"\Delta W =") and "e_{pre}^{T}" in data["latex"]
    back = rule_from_json(data)
    np.testing.assert_array_equal(np.asarray(back.theta), np.asarray(rule.theta))
    assert back.names == rule.names
    assert data["format_version"] == RULE_JSON_VERSION
    # a file from a newer format is refused with the fix, not misread
    with pytest.raises(MetaplasticError, match="upgrade metaplastic"):
        rule_from_json({**data, "format_version": RULE_JSON_VERSION + 1})
    # the formats that exist are 1 and 2; a bump of the version must come with a reader for
    # it (and an update here), never silently accept files it was not written for
    assert RULE_JSON_VERSION == 2
    rule_from_json({**data, "format_version": 1})
    with pytest.raises(MetaplasticError, match="format_version"):
        rule_from_json({**data, "format_version": "2"})


def test_per_layer_equations():
    rule = TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.1, 0.2], n_layers=2)
    eqs = equations(rule, 0.0)
    assert set(eqs) == {"layer0", "layer1"}
    assert format_rule(rule, "text", 0.0).startswith("layer0: dW =")
    one = TermPoolRule.from_names(["pseudo_gradient"], [0.1], n_layers=1)
    assert format_rule(one, "text", 0.0) == "dW = -0.1*e*x.T"
    with pytest.raises(MetaplasticError, match="unknown format"):
        format_rule(rule, "html", 0.0)


def test_rule_from_bad_json():
    with pytest.raises(MetaplasticError, match="not a metaplastic rule"):
        rule_from_json([1, 2])
    with pytest.raises(MetaplasticError, match="malformed"):
        rule_from_json({"kind": "term_pool", "terms": ["oja"]})
    with pytest.raises(MetaplasticError, match="not finite"):
        rule_from_json(
            {"kind": "term_pool", "terms": ["oja"], "mask": [True], "theta": [float("nan")]}
        )


def test_split_is_disjoint_and_seeded(digits):
    a_tr, a_te = split_pools(digits, 0.5, 0)
    b_tr, b_te = split_pools(digits, 0.5, 0)
    c_tr, _ = split_pools(digits, 0.5, 1)
    tr = set(np.asarray(a_tr.class_index).ravel())
    te = set(np.asarray(a_te.class_index).ravel())
    assert not tr & te
    np.testing.assert_array_equal(a_tr.class_index, b_tr.class_index)
    assert not np.array_equal(a_tr.class_index, c_tr.class_index)
    for c in range(10):  # each class row holds images of that class only
        assert set(digits.y[np.asarray(a_te.class_index[c])]) == {c}


def test_episode_sampling(pools, digits):
    task = ClassificationTask(n_way=4, k_shot=5, q_query=3)
    eps = jax.vmap(lambda k: task.sample(k, pools[0]))(jax.random.split(jax.random.key(0), 20))
    assert eps.train_x.shape == (20, 20, 64) and eps.query_x.shape == (20, 12, 64)
    x_all = np.asarray(pools[0].x)
    for i in range(20):
        ty, qy = np.asarray(eps.train_y[i]), np.asarray(eps.query_y[i])
        assert sorted(np.bincount(ty, minlength=4)) == [5] * 4
        assert sorted(np.bincount(qy, minlength=4)) == [3] * 4

        # relabelled classes are consistent: each new label maps to one original class
        def rows(xs):
            return [int(np.flatnonzero((x_all == x).all(1))[0]) for x in np.asarray(xs)]

        tr_rows, q_rows = rows(eps.train_x[i]), rows(eps.query_x[i])
        assert not set(tr_rows) & set(q_rows)
        for lab in range(4):
            orig = {
                int(digits.y[r])
                for r, t in zip(tr_rows + q_rows, np.concatenate([ty, qy]))
                if t == lab
            }
            assert len(orig) == 1
    # training order is shuffled, not grouped by class
    assert any(not np.all(np.diff(np.asarray(eps.train_y[i])) >= 0) for i in range(20))
    # classes are sampled without replacement and vary across episodes
    assert len({tuple(np.asarray(eps.train_y[i])) for i in range(20)}) > 1


def test_episode_images_are_distinct_and_cover_the_class():
    """Images are drawn without replacement within an episode, and every image of a class
    gets drawn across episodes (the top-k-of-uniform-keys sampler is not biased to a
    subset)."""
    from metaplastic.tasks._data import ImagePool

    n_cls, per = 3, 12
    pool = ImagePool(
        x=jnp.arange(n_cls * per, dtype=jnp.float32)[:, None],
        class_index=jnp.arange(n_cls * per).reshape(n_cls, per),
    )
    task = ClassificationTask(n_way=3, k_shot=6, q_query=4)
    eps = jax.vmap(lambda k: task.sample(k, pool))(jax.random.split(jax.random.key(1), 200))
    seen = set()
    for i in range(200):
        rows = np.concatenate([np.asarray(eps.train_x[i, :, 0]), np.asarray(eps.query_x[i, :, 0])])
        assert len(set(rows.tolist())) == rows.size == 30
        seen |= set(rows.astype(int).tolist())
    assert seen == set(range(n_cls * per))


def test_meta_test_images_never_in_meta_train(pools):
    task = ClassificationTask(n_way=5, k_shot=20, q_query=10)
    tr_rows = set(np.asarray(pools[0].class_index).ravel())
    ep = task.sample(jax.random.key(4), pools[1])
    x_all = np.asarray(pools[1].x)
    for x in np.asarray(ep.query_x):
        r = np.flatnonzero((x_all == x).all(1))
        assert not set(r.tolist()) <= tr_rows


def test_rule_files_are_written_and_read_back(tmp_path):
    from metaplastic.export._export import format_rule, read_rule_file, write_rule_files

    rule = TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.5, 0.25])
    data = write_rule_files(tmp_path, rule, 0.0)
    text = (tmp_path / "rule.json").read_text()
    assert text.endswith("}\n") and text.splitlines()[1].startswith('  "')
    assert not text.splitlines()[1].startswith("   ")  # indented by 2
    assert (tmp_path / "rule.tex").read_text() == data["latex"] + "\n"
    back = read_rule_file(tmp_path)
    assert back.coefficients() == rule.coefficients()
    js = format_rule(rule, "json", 0.0)
    assert js.splitlines()[1].startswith('  "') and not js.splitlines()[1].startswith("   ")


def test_rule_expression_keeps_every_coefficient_by_default_and_prunes_at_the_threshold():
    from metaplastic.export._export import pruned_terms, rule_expression

    rule = TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.5, 0.25])
    assert rule_expression(rule) != 0 and len(rule_expression(rule).free_symbols) >= 3
    assert pruned_terms(rule, 0.25) == ["oja"]  # at the threshold: pruned
    assert pruned_terms(rule, 0.2) == []


def test_rule_files_with_format_version_zero_are_refused():
    from metaplastic.export._export import rule_from_json, rule_to_json

    rule = TermPoolRule.from_names(["pseudo_gradient"], [0.5])
    data = rule_to_json(rule, 0.0)
    assert rule_from_json(dict(data, format_version=1)).coefficients() == rule.coefficients()
    for bad in (0, -1, True, "2"):
        with pytest.raises(MetaplasticError, match="format_version"):
            rule_from_json(dict(data, format_version=bad))


def _chain_rule_and_score():
    """Four coefficients a < b < c < d: d can always go, c only once d is gone, b only once
    c is gone, a only once b is gone (so each sweep removes one more)."""
    rule = TermPoolRule.from_names(
        ["pseudo_gradient", "error_hebbian", "oja", "hebbian"], [0.1, 0.2, 0.3, 0.4]
    )

    def score(r):
        a, b, c, d = (float(v) != 0.0 for v in np.asarray(r.theta).reshape(-1))
        cost = 0.5 * ((not a and b) + (not b and c) + (not c and d))
        return 1.0 - cost

    return rule, score


def test_prune_by_effect_sweeps_until_nothing_more_goes():
    from metaplastic.export._export import prune_by_effect

    rule, score = _chain_rule_and_score()
    pruned, report = prune_by_effect(rule, score, 0.01)  # at most 3 sweeps by default
    assert report[0] == {"pass": 0, "coefficient": "(none)", "score": 1.0, "pruned": False}
    gone = [(e["pass"], e["coefficient"]) for e in report[1:] if e["pruned"]]
    assert gone == [(1, "hebbian"), (2, "oja"), (3, "error_hebbian")]
    assert np.asarray(pruned.theta).reshape(-1).tolist() == pytest.approx([0.1, 0, 0, 0])
    tried = {e["coefficient"] for e in report[1:]}
    assert tried == {"pseudo_gradient", "error_hebbian", "oja", "hebbian"}
    _, report = prune_by_effect(rule, score, 0.01, max_passes=4)
    assert [e["coefficient"] for e in report[1:] if e["pruned"]][-1] == "pseudo_gradient"
    _, report = prune_by_effect(rule, score, 0.01, max_passes=2)
    assert max(e["pass"] for e in report[1:]) == 2


def test_prune_by_effect_keeps_a_coefficient_whose_cost_equals_the_tolerance():
    from metaplastic.export._export import prune_by_effect

    rule = TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.5, 0.0])  # oja is off

    def score(r):
        return 1.0 - 0.25 * (float(np.asarray(r.theta).reshape(-1)[0]) == 0.0)

    pruned, report = prune_by_effect(rule, score, 0.25)
    assert [e["coefficient"] for e in report[1:]] == ["pseudo_gradient"]  # zeros not tried
    assert not report[1]["pruned"] and float(np.asarray(pruned.theta).reshape(-1)[0]) == 0.5


def test_prune_by_effect_on_a_rule_without_a_mask():
    """Equation rules have no mask: every coefficient is a candidate."""
    from metaplastic.export._export import coefficient_getter, prune_by_effect
    from metaplastic.rules import EquationRule

    rule = EquationRule.from_text("-0.05*e*x.T + 0.01*(y*x.T - y*y.T*W)")
    get = coefficient_getter(rule)

    def score(r):
        return 1.0 - 0.5 * (float(np.asarray(get(r))[0]) == 0.0)

    pruned, report = prune_by_effect(rule, score, 0.1)
    # smallest first; a second sweep, since the first removed something
    assert [(e["pass"], e["pruned"]) for e in report[1:]] == [(1, True), (1, False), (2, False)]
    np.testing.assert_allclose(np.asarray(get(pruned)), [-0.05, 0.0])


def test_prune_by_effect_refits_the_rest_when_a_coefficient_alone_costs_too_much():
    """Score 1 - 10 |a + b - 0.75|: zeroing a alone costs 2.5, but refitting b to 0.75 brings
    it back, so a goes with the refit kept; a final refit of what is left is reported."""
    import equinox as eqx

    from metaplastic.export._export import coefficient_getter, prune_by_effect

    rule = TermPoolRule.from_names(["pseudo_gradient", "oja"], [0.25, 0.5])
    get = coefficient_getter(rule)

    def score(r):
        a, b = (float(v) for v in np.asarray(get(r)))
        return 1.0 - 10.0 * abs(a + b - 0.75)

    def refit(r, keep):
        th = np.asarray(get(r), np.float32) * np.asarray(keep)
        th[np.argmax(keep)] += 0.75 - th.sum()  # the first kept coefficient takes it all
        return eqx.tree_at(get, r, jnp.asarray(th))

    pruned, report = prune_by_effect(rule, score, 0.01, refit=refit)
    first = report[1]
    assert first["coefficient"] == "pseudo_gradient" and first["pruned"]
    assert first["refit"] == {"oja": pytest.approx(0.75)}
    np.testing.assert_allclose(np.asarray(get(pruned)), [0.0, 0.75], atol=1e-6)
    final = report[-1]
    assert final["pass"] == "final refit" and final["accepted"] and not final["pruned"]
    assert final["refit"] == {"oja": pytest.approx(0.75)}
    # with no tolerance at all nothing goes, not even when the refit scores exactly as well
    kept, report = prune_by_effect(rule, score, 0.0, refit=refit)
    assert not any(e["pruned"] for e in report) and np.all(np.asarray(get(kept)) != 0)


def test_prune_by_effect_per_layer_taylor_rule():
    """Per-layer coefficients with a mask over the 81 monomials: the live ones are tried
    and labelled by name (layer, monomial)."""
    from metaplastic.export._export import coefficient_getter, prune_by_effect
    from metaplastic.rules import TaylorRule

    rule = TaylorRule.from_monomials(["1001", "1100"], [-0.05, 0.01], n_layers=2)
    get = coefficient_getter(rule)
    names = list(rule.coefficients())

    def score(r):
        th = np.asarray(get(r))
        return 1.0 - 0.5 * float(np.sum(th[:, np.flatnonzero(th[0])[:1]] == 0.0))

    _, report = prune_by_effect(rule, score, 0.1)
    tried = {e["coefficient"] for e in report[1:]}
    assert len(tried) == 4 and tried <= set(names)
