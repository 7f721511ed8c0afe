"""batchjobs: offline batch LLM inference jobs on Ray Data.

Importing this package is cheap: no engine, torch or Ray is imported until a job runs.
"""

__version__ = "0.1.0"

# The Python API for orchestrators, imported when first used (no Ray at import time):
# batchjobs.submit(spec, address=...) -> Submission, batchjobs.wait(submission_id, ...) ->
# Outcome, batchjobs.status(...), batchjobs.stop(...). See batchjobs.ops.jobs.
_API = ("submit", "wait", "status", "stop")


def __getattr__(name: str):
    if name in _API:
        from batchjobs.ops import jobs

        return getattr(jobs, name)
    raise AttributeError(f"module 'batchjobs' has no attribute {name!r}")
