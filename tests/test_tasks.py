"""Tasks as an extension point: the registry, the luminosity shift, and a task defined
outside the package running in train."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaplastic.inner import NETWORKS, Network, register_network
from metaplastic.run import build_config, build_setup, train
from metaplastic.tasks import TASKS, ClassificationTask, PCATask, register_task

from .conftest import tiny_task


def test_built_in_kinds_are_registered_and_unknown_kinds_name_the_choices():
    assert TASKS["classification"] is ClassificationTask and TASKS["pca"] is PCATask
    with pytest.raises(Exception, match="task kind.*classification"):
        build_config("pool", "digits", None, ["task.kind=reward"])


def test_luminosity_shift_offsets_each_image_by_one_clipped_amount():
    cfg = build_config("pool", "digits", None, ["task.luminosity_shift=0.5"])
    setup = build_setup(cfg)
    plain = ClassificationTask(5, 20, 10)
    key = jax.random.key(3)
    a, b = plain.sample(key, setup.meta_train), setup.task.sample(key, setup.meta_train)
    assert np.array_equal(a.train_y, b.train_y) and np.array_equal(a.query_y, b.query_y)
    for x0, x1 in ((a.train_x, b.train_x), (a.query_x, b.query_x)):
        assert float(x1.min()) >= 0.0 and float(x1.max()) <= 1.0
        inside = (x1 > 0) & (x1 < 1)  # pixels the clip did not touch moved by the offset
        delta = jnp.where(inside, x1 - x0, jnp.nan)
        spread = np.nanmax(np.asarray(delta), axis=1) - np.nanmin(np.asarray(delta), axis=1)
        assert np.nanmax(spread) < 1e-6  # one offset per image
        offsets = np.nanmean(np.asarray(delta), axis=1)
        assert np.nanmax(np.abs(offsets)) <= 0.5 and np.nanstd(offsets) > 0.05
    with pytest.raises(Exception, match="luminosity_shift"):
        build_config("pool", "digits", None, ["task.luminosity_shift=2"])


def test_a_task_and_a_network_from_outside_the_package_register_and_train(tmp_path):
    class Inverted(ClassificationTask):
        """Classification of photographic negatives: every pixel ``x -> 1 - x``."""

        name: ClassVar[str] = "inverted_test"

        def sample(self, key, pool):
            ep = super().sample(key, pool)
            return type(ep)(1.0 - ep.train_x, ep.train_y, 1.0 - ep.query_x, ep.query_y)

    class HalvedMLP(Network):
        """The MLP with every hidden drive halved."""

        name: ClassVar[str] = "halved_mlp_tasks_test"

        def pre(self, state, layer, h):
            z = super().pre(state, layer, h)
            return 0.5 * z if layer < self.n_layers - 1 else z

    register_task(Inverted)
    register_network(HalvedMLP)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_task(type("Other", (Inverted,), {"name": "pca"}))
        task = tmp_path / "tiny.toml"
        task.write_text(tiny_task().replace("[task]\n", '[task]\nkind = "inverted_test"\n'))
        cfg = build_config("pool", str(task), None, ["network.kind=halved_mlp_tasks_test"])
        setup = build_setup(cfg)
        assert isinstance(setup.task, Inverted) and isinstance(setup.net, HalvedMLP)
        ep = setup.task.sample(jax.random.key(0), setup.meta_train)
        assert float(ep.train_x.min()) >= 0.0 and float(ep.train_x.max()) <= 1.0
        summary = train(cfg, tmp_path / "run", progress=False)
        assert summary["status"] == "ok"
    finally:
        TASKS.pop("inverted_test", None)
        NETWORKS.pop("halved_mlp_tasks_test", None)
