"""Fuzz the CLI with generated malformed configs: never a traceback, always exit 2, one line."""

from __future__ import annotations

import random

import pytest
from click.testing import CliRunner

from metaplastic.run._cli import main

VALID_TASK = {
    "task": {"dataset": '"digits"', "n_way": "3", "k_shot": "2", "q_query": "2"},
    "network": {"hidden": "[6]", "activation": '"softplus"', "beta": "10.0"},
    "train": {"meta_batch": "2", "episodes": "4", "lr": "0.01", "feedback": '"fa"'},
}
VALID_RULE = {"rule": {"terms": '["pseudo_gradient", "oja"]', "init": "[0.1, 0.0]"}}

# Values that are wrong for the key they replace, whatever that key is (by type or range).
BAD_VALUES = {
    "dataset": ['"digitz"', "3", "[]", '"mnist-2"'],
    "n_way": ["1", "0", "-3", '"five"', "2.5", "99", "true"],
    "k_shot": ["0", "-1", '"a"', "1.5", "500"],
    "q_query": ["0", "-2", "[1]", "400"],
    "hidden": ["[0]", "[-3]", "6", '["a"]', "[1.5]"],
    "activation": ['"sigmoidd"', "1", "[]"],
    "beta": ["0", "-1.0", '"x"', "nan", "inf"],
    "meta_batch": ["0", "-1", "1.5", '"2"'],
    "episodes": ["0", "-4", "1", '"many"'],
    "lr": ["0", "-0.1", '"fast"', "nan"],
    "feedback": ['"dfaa"', '"FA"', "1"],
    "terms": ['["ojaa"]', "[]", '"oja"', '["oja", "oja"]', "[1]"],
    "init": ["[0.1]", "[0.1, 0.2, 0.3]", '["a", "b"]', "0.1"],
}
GARBAGE = ["[task", "n_way = = 3", "[[task]]\nx=1", "\x00\x01", "task = 5", "= 3", "[task]\n[task]"]


def _render(tables):
    return "\n".join(
        f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in body.items())
        for name, body in tables.items()
    )


def _mutate(rng: random.Random):
    """One malformed (rule, task) pair and which file it breaks."""
    rule = {k: dict(v) for k, v in VALID_RULE.items()}
    task = {k: dict(v) for k, v in VALID_TASK.items()}
    kind = rng.choice(["bad_value", "unknown_key", "unknown_table", "garbage", "missing_table"])
    target = rng.choice(["rule", "task"])
    tables = rule if target == "rule" else task
    if kind == "bad_value":
        candidates = [(t, k) for t, b in tables.items() for k in b if k in BAD_VALUES]
        t, k = rng.choice(candidates)
        tables[t][k] = rng.choice(BAD_VALUES[k])
        text = _render(tables)
    elif kind == "unknown_key":
        t = rng.choice(list(tables))
        tables[t][rng.choice(["nway", "lr_", "terms2", "hiden", "sed", "foo"])] = "1"
        text = _render(tables)
    elif kind == "unknown_table":
        tables[rng.choice(["rules", "tsk", "net", "training"])] = {"x": "1"}
        text = _render(tables)
    elif kind == "missing_table":
        text = _render({k: v for k, v in tables.items() if k not in ("rule", "task")})
    else:
        text = _render(tables) + "\n" + rng.choice(GARBAGE) + "\n"
    other = _render(task if target == "rule" else rule)
    return (text, other) if target == "rule" else (other, text)


def test_fuzz_malformed_configs(tmp_path):
    rng = random.Random(1234)
    runner = CliRunner()
    seen = set()
    for i in range(220):
        rule_text, task_text = _mutate(rng)
        rp, tp = tmp_path / f"r{i}.toml", tmp_path / f"t{i}.toml"
        rp.write_text(rule_text)
        tp.write_text(task_text)
        res = runner.invoke(
            main,
            [
                "train",
                "--rule",
                str(rp),
                "--task",
                str(tp),
                "--quiet",
                "--out",
                str(tmp_path / f"run{i}"),
            ],
        )
        msg = res.stderr.strip()
        assert res.exit_code == 2, (rule_text, task_text, res.output, res.exception)
        assert msg.startswith("metaplastic: error: ") and len(msg.splitlines()) == 1, msg
        assert "Traceback" not in res.output
        assert not (tmp_path / f"run{i}").exists()  # nothing written for a rejected config
        seen.add(msg.split(":")[3] if msg.count(":") > 3 else msg)
    assert len(seen) > 10  # the generator really exercises different errors


@pytest.mark.parametrize("value", ["lr=abc", "train.lr", "x.y=1", "train.meta_batch=0"])
def test_bad_set_values_exit_2(value):
    res = CliRunner().invoke(main, ["train", "--rule", "pool", "--task", "digits", "--set", value])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
