"""Tasks the rules are meta-learned on: data sets and their splits, online few-shot
classification, class-incremental (continual) learning, principal-component extraction
(the Oja ground truth), and the :class:`Problem` that turns a task, a network and a rule
into a meta-loss."""

from ._classification import (
    ClassificationTask,
    luminosity_shift,
)
from ._continual import (
    ContinualTask,
)
from ._data import (
    DATASETS,
    Dataset,
    ImagePool,
    load_dataset,
    split_pools,
    split_validation,
    train_test_arrays,
)
from ._pca import (
    PCATask,
)
from ._problem import (
    Problem,
    evaluate_outcomes,
    evaluate_rule,
)
from ._stats import (
    bootstrap_ci,
    mean_ci95,
    paired_difference,
)
from ._task import (
    TASKS,
    AbstractTask,
    register_task,
    task_class,
)

__all__ = [
    "TASKS",
    "AbstractTask",
    "register_task",
    "task_class",
    "ClassificationTask",
    "ContinualTask",
    "luminosity_shift",
    "DATASETS",
    "Dataset",
    "ImagePool",
    "PCATask",
    "Problem",
    "evaluate_outcomes",
    "evaluate_rule",
    "load_dataset",
    "mean_ci95",
    "bootstrap_ci",
    "paired_difference",
    "split_pools",
    "split_validation",
    "train_test_arrays",
]

for _cls in (ClassificationTask, ContinualTask, PCATask):
    register_task(_cls)
