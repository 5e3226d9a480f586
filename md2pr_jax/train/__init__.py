"""Training: state, optimizer, the jitted steps and the inner loop (the teacher's fine-tuning
runs through the same loop, `teacher.make_teacher_train_step`)."""

from md2pr_jax.train.loop import numpy_tree, train_loop
from md2pr_jax.train.optimizer import decay_mask, make_optimizer, make_schedule
from md2pr_jax.train.state import (
    TrainState,
    abstract_teacher_params,
    abstract_train_state,
    create_train_state,
    place_teacher_params,
    state_shardings,
    teacher_param_shardings,
)
from md2pr_jax.train.step import (
    make_eval_step,
    make_train_step,
    student_forward,
    teacher_forward,
)

__all__ = [
    "TrainState",
    "abstract_teacher_params",
    "abstract_train_state",
    "create_train_state",
    "decay_mask",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "numpy_tree",
    "place_teacher_params",
    "state_shardings",
    "student_forward",
    "teacher_forward",
    "teacher_param_shardings",
    "train_loop",
]
