"""batchjobs: offline batch LLM inference jobs on Ray Data.

Importing this package is cheap: no engine, torch or Ray is imported until a job runs.
"""

__version__ = "0.1.0"
