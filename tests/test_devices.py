"""Sharding over devices: 1 and 4 (forced host) devices give bit-identical results with the
default settings (train.vmap_width left at 0 = auto)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from metaplastic._errors import MetaplasticError

from .test_checkpoint import TASK as TINY_TASK

#: Hidden widths at which vmapping a device's whole share (train.vmap_width = -1, the former
#: default) makes 1 and 4 devices differ in the last bits of the gradient outer loop; with the
#: tiny test network ([6]) they happen to agree, which would not test the default.
TASK = TINY_TASK.replace("hidden = [6]", "hidden = [16, 8]")
assert TASK != TINY_TASK

SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path
import jax
from metaplastic.run._config import build_config
from metaplastic.run._run import train
assert len(jax.devices()) == 4, jax.devices()
tmp = Path(tempfile.mkdtemp())
(tmp / "t.toml").write_text(sys.argv[1])
out = {}
for outer in ("adam", "open_es"):
    for n in (1, 4):
        cfg = build_config("pool", str(tmp / "t.toml"), {"episodes": 8},
                           [f"train.outer='{outer}'", f"train.devices={n}",
                            "train.population=4", "train.meta_batch=4"])
        train(cfg, tmp / f"{outer}{n}", progress=False, evaluate=False)
        run = tmp / f"{outer}{n}"
        out[f"{outer}{n}"] = [json.loads((run / "rule.json").read_text())["theta"],
                              (run / "metrics.jsonl").read_text()]
print(json.dumps(out))
"""


def test_one_and_four_devices_agree_bit_for_bit():
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags.strip())
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, TASK], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["adam1"] == out["adam4"]
    assert out["open_es1"] == out["open_es4"]


def test_device_settings_are_validated():

    from metaplastic.outer._sharding import AxisSharding

    with pytest.raises(MetaplasticError, match="sees 1 device"):
        AxisSharding(4, 8, "meta_batch")
    with pytest.raises(MetaplasticError, match="vmap_width=3 must divide"):
        AxisSharding(1, 8, "meta_batch", width=3)
    with pytest.raises(MetaplasticError, match="vmap_width=-2 must divide"):
        AxisSharding(1, 8, "meta_batch", width=-2)
    assert AxisSharding(0, 7, "meta_batch").n == 1
    # the default chunk width does not depend on the device count (nor on the axis size)
    assert AxisSharding(0, 8, "meta_batch").width == AxisSharding(1, 6, "population").width == 1
    assert AxisSharding(1, 8, "meta_batch", width=-1).width == -1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "outer",
    # the ES population is split over processes like the meta-batch. Both run with -m slow
    # (two processes over loopback, ~90 s each on 2 cores); the one-process four-device test
    # keeps sharding in the default run
    [
        pytest.param("adam", marks=pytest.mark.slow),
        pytest.param("open_es", marks=pytest.mark.slow),
    ],
)
def test_two_processes_over_loopback_match_a_single_process(tmp_path, outer):
    from metaplastic.run._config import build_config
    from metaplastic.run._run import train

    task = tmp_path / "t.toml"
    task.write_text(TASK)
    common = [
        "--rule",
        "pool",
        "--task",
        str(task),
        "--episodes",
        "8",
        "--quiet",
        "--set",
        "train.meta_batch=4",
        "--set",
        "train.population=4",
    ]
    single = tmp_path / f"single-{outer}"
    cfg = build_config(
        "pool",
        str(task),
        {"episodes": 8},
        [
            "train.meta_batch=4",
            "train.population=4",
            f"train.outer='{outer}'",
            "train.devices=1",
        ],
    )
    train(cfg, single, progress=False, evaluate=False)
    multi = tmp_path / f"multi-{outer}"
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "metaplastic",
                "train",
                *common,
                "--set",
                f"train.outer='{outer}'",
                "--set",
                "train.devices=4",
                "--out",
                str(multi),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    theta = json.loads((single / "rule.json").read_text())["theta"]
    assert json.loads((multi / "rule.json").read_text())["theta"] == theta
    assert json.loads((multi / "process-1" / "rule.json").read_text())["theta"] == theta


def test_multi_process_settings_are_checked():

    from metaplastic.run._distributed import init_distributed

    assert init_distributed(None, None, None) is False
    with pytest.raises(MetaplasticError, match="needs --num-processes and --process-id"):
        init_distributed("127.0.0.1:1", None, None)
    with pytest.raises(MetaplasticError, match="must be in 0..1"):
        init_distributed("127.0.0.1:1", 2, 5)
