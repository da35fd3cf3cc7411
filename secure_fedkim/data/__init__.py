"""The data layer: the task registry, real installed data for the 8 tasks, user-brought data, partitions.

    from secure_fedkim.data import load_task, load_user_data, partition_task
    data = load_task("heart_disease")                       # TaskData: x, y, site, group
    split = partition_task(data, ["cleveland", "hungary", "switzerland", "va_long_beach"], scheme="natural")
    shard = data.subset(split.clients["hungary"])
"""

from secure_fedkim.data.formats import FIXED_SHAPES, DataError, TaskData, load_user_data
from secure_fedkim.data.loaders import load_task
from secure_fedkim.data.partition import TaskSplit, partition_task
from secure_fedkim.data.tasks import MODALITIES, TASKS, Task, get_task

__all__ = [
    "DataError",
    "FIXED_SHAPES",
    "MODALITIES",
    "TASKS",
    "Task",
    "TaskData",
    "TaskSplit",
    "get_task",
    "load_task",
    "load_user_data",
    "partition_task",
]
