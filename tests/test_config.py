"""Config parsing and validation: every user error is one clear MetaplasticError line."""

from __future__ import annotations

import numpy as np
import pytest

from metaplastic._errors import MetaplasticError
from metaplastic.run._config import (
    apply_overrides,
    build_config,
    config_from_dict,
    list_presets,
    load_rule,
    load_task,
)


def test_presets_are_listed_and_load():
    assert {"pool", "pseudo_gradient"} <= set(list_presets("rules"))
    assert "digits" in list_presets("tasks")
    r = load_rule("pool")
    assert r.terms == ("pseudo_gradient", "error_hebbian", "oja") and r.name == "pool"
    t, n, train = load_task("digits")
    assert (t.n_way, t.dataset) == (5, "digits") and n.hidden == (50, 40, 30, 20)
    assert train["lr"] == 0.001


def test_build_config_precedence():
    cfg = build_config("pool", "digits", {"lr": 0.5, "seed": None}, ["train.seed=7"])
    assert cfg.train.lr == 0.5 and cfg.train.seed == 7 and cfg.train.meta_batch == 16
    assert config_from_dict(cfg.to_dict(), "x") == cfg


def _write(tmp_path, text, name="r.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


BAD_RULES = [
    ("[rule]\nterms = ['ojaa']\n", "did you mean 'oja'"),
    ("[rule]\nterms = ['oja']\nint = [1.0]\n", "unknown key 'int'; did you mean 'init'"),
    ("[rule]\nterms = 'oja'\n", "expected a list"),
    ("[rule]\nterms = ['oja']\ninit = [1.0, 2.0]\n", "one per term"),
    ("[rule]\nterms = ['oja', 'oja']\n", "listed twice"),
    ("[rule]\nterms = []\n", "at least one term"),
    ("[rule]\nterms = ['oja']\nshared = 'yes'\n", "true or false"),
    ("[rule\nterms = ['oja']\n", "invalid TOML"),
    ("[rules]\nterms = ['oja']\n", "unknown table 'rules'"),
    ("terms = ['oja']\n", "unknown table 'terms'"),
    ("[rule]\nkind = 'banana'\nterms = ['oja']\n", "unknown rule kind"),
    ("[rule]\nkind = 'taylor'\nmonomials = ['x**3']\n", "not a monomial"),
    ("[rule]\nkind = 'equation'\nequations = []\n", "at least one equation"),
    ("[rule]\nkind = 'equation'\nequations = ['os.system(1)']\n", "not allowed"),
    ("[rule]\nkind = 'mlp'\nmlp_hidden = [0]\n", "positive widths"),
]


@pytest.mark.parametrize("text,msg", BAD_RULES)
def test_malformed_rule_files(tmp_path, text, msg):
    with pytest.raises(MetaplasticError, match=msg) as err:
        load_rule(_write(tmp_path, text))
    assert "\n" not in str(err.value)
    assert "r.toml" in str(err.value)


BAD_TASKS = [
    ("[task]\ndataset = 'digitz'\n", "did you mean 'digits'"),
    ("[task]\nn_way = 1\n", "at least 2"),
    ("[task]\nk_shot = 0\n", "must be positive"),
    ("[task]\ntest_fraction = 1.5\n", "strictly between"),
    ("[task]\n[network]\nhidden = [0]\n", "widths must be positive"),
    ("[task]\n[network]\nactivation = 'sigmoid'\n", "unknown activation"),
    ("[task]\n[train]\nfeedback = 'dfa2'\n", "unknown feedback mode"),
    ("[task]\n[train]\nlr = -1.0\n", "must be positive"),
    ("[task]\n[train]\nmeta_batch = 1.5\n", "expected an integer"),
    ("[task]\n[train]\nepisodes = 4\nmeta_batch = 8\n", "smaller than"),
    ("[network]\nhidden = [3]\n", "missing the \\[task\\] table"),
    ("[task]\nval_fraction = 1.0\n", "val_fraction must be strictly between"),
    ("[task]\n[network]\nn_out = -1\n", "n_out must be >= 0"),
    ("[task]\n[train]\nseed = 4294967296\n", "seed must be an integer in"),
    ("[task]\n[train]\nseed = -1\n", "seed must be an integer in"),
    ("[task]\n[train]\nmax_skipped = 1.5\n", "must be a fraction"),
    ("[task]\n[train]\nprune_refit = -1\n", "prune_refit must be >= 0"),
    ("[task]\n[train]\nouter = 'Open_ES'\nprune_refit = 10\n", "prune_refit refits with"),
]


@pytest.mark.parametrize("text,msg", BAD_TASKS)
def test_malformed_task_files(tmp_path, text, msg):
    with pytest.raises(MetaplasticError, match=msg) as err:
        load_task(_write(tmp_path, text, "t.toml"))
    assert "\n" not in str(err.value)


def test_unknown_preset_names():
    with pytest.raises(MetaplasticError, match="did you mean 'pool'"):
        load_rule("pol")
    with pytest.raises(MetaplasticError, match="no such rule file"):
        load_rule("missing/file.toml")


def test_preset_names_are_not_shadowed_by_files_here(tmp_path, monkeypatch):
    """A spec is a path only with a separator or a .toml suffix: a folder ``digits/`` or a
    file ``pool`` in the working directory does not hide the presets of those names."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    (tmp_path / "pool").write_text("not toml")
    (tmp_path / "mine").write_text('[rule]\nterms = ["oja"]\n')
    cfg = build_config("pool", "digits")
    assert cfg.rule.name == "pool" and cfg.task.name == "digits"
    assert load_rule("./mine").terms == ("oja",)
    with pytest.raises(MetaplasticError, match=r"unknown rule preset 'mine'.*write \./mine"):
        load_rule("mine")
    with pytest.raises(MetaplasticError, match="no such task file"):
        load_task("./digits")


@pytest.mark.parametrize(
    "override,msg",
    [
        ("train.lr", "section.key=value"),
        ("trian.lr=1", "did you mean 'train'"),
        ("train.lrr=1", "did you mean 'lr'"),
        ("train.lr=abc", "expected a number"),
        ("train.outer=adamm", "did you mean 'adam'"),
    ],
)
def test_bad_overrides(override, msg):
    cfg = build_config("pool", "digits")
    with pytest.raises(MetaplasticError, match=msg):
        apply_overrides(cfg, [override])


def test_impossible_task_shapes():
    from metaplastic.run._run import build_setup

    cfg = build_config("pool", "digits", overrides=["task.n_way=11"])
    with pytest.raises(MetaplasticError, match="larger than the 10 classes"):
        build_setup(cfg)
    cfg = build_config("pool", "digits", overrides=["task.k_shot=80", "task.q_query=10"])
    with pytest.raises(MetaplasticError, match="images per class"):
        build_setup(cfg)


def test_output_width_separate_from_n_way():
    """network.n_out sets the output layer (0 = n_way); fewer units than classes is refused."""
    from metaplastic.run._run import build_setup

    assert build_setup(build_config("pool", "digits")).net.sizes[-1] == 10  # the preset
    narrow = build_config("pool", "digits", overrides=["network.n_out=0"])
    assert build_setup(narrow).net.sizes[-1] == 5  # 0 = n_way
    wide = build_config("pool", "digits", overrides=["network.n_out=47"])
    assert build_setup(wide).net.sizes[-1] == 47
    with pytest.raises(MetaplasticError, match="smaller than task.n_way"):
        build_setup(build_config("pool", "digits", overrides=["network.n_out=3"]))


def test_validation_split_is_disjoint_from_meta_train_and_meta_test():
    from metaplastic.run._run import build_setup

    setup = build_setup(build_config("pool", "digits"))
    rows = [
        set(np.asarray(p.class_index).ravel().tolist())
        for p in (setup.meta_train, setup.meta_val, setup.meta_test)
    ]
    assert rows[0].isdisjoint(rows[1]) and rows[1].isdisjoint(rows[2])
    assert rows[0].isdisjoint(rows[2]) and all(rows)
