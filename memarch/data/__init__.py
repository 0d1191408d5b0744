"""Data for memarch: MQAR (zoology semantics) and packed TFDS text, fed through grain.

The training loop uses only ``TaskInfo``, ``get_task_info`` and ``build_iterator``; new tasks
plug in with ``register_task``.
"""

from memarch.data.pipeline import RecordTask
from memarch.data.pipeline import TaskInfo
from memarch.data.pipeline import build_iterator
from memarch.data.pipeline import get_task_info
from memarch.data.pipeline import register_task

__all__ = ["RecordTask", "TaskInfo", "build_iterator", "get_task_info", "register_task"]
