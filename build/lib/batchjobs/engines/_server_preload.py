"""Imported by the warm fork server only (``warmstart.PRELOAD``): runs ``preload.preload``.

A fork server's preload is a list of modules to import; this one's import does the work.
"""

from batchjobs.engines.preload import preload

preload()
