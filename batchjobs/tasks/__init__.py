"""Tasks: the kinds of job (``spec.task``). One module per kind; this is their registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchjobs.tasks.base import Prepared, RowError, Task
from batchjobs.tasks.chat import ChatTask
from batchjobs.tasks.embed import EmbedTask
from batchjobs.tasks.eval import EvalTask
from batchjobs.tasks.generate import GenerateTask

if TYPE_CHECKING:  # pragma: no cover
    from batchjobs.spec import JobSpec

TASKS: dict[str, type[Task]] = {t.name: t for t in (GenerateTask, ChatTask, EmbedTask, EvalTask)}


def task_for(spec: JobSpec) -> Task:
    if spec.input.format == "openai_batch":  # each line's url says what it asks for
        from batchjobs.openai_batch.tasks import openai_task

        return openai_task(spec)
    return TASKS[spec.task](spec)


__all__ = ["TASKS", "Prepared", "RowError", "Task", "task_for"]
