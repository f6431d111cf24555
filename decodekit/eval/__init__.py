"""Evaluation: decoding methods compared on tasks (GSM8K, HumanEval, MBPP, summarization, translation) with
bootstrap confidence intervals, tokens/s and tokens per answer; model-written code runs in a sandbox.

A task is one file and one import line below (see `base.py`).
"""
from . import gsm8k, humaneval, mbpp, summarization, translation  # noqa: F401  (each registers its task)
from .base import TASKS, Item, Task, make_task, register

__all__ = ["TASKS", "Item", "Task", "make_task", "register"]
