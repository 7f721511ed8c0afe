"""Operating jobs on a Ray cluster from outside it: submit a job spec through Ray's job API,
re-attach to it, wait for it, stop it (``jobs``), what the submission ships (``ship``), the
head's token (``auth``), and the checks the driver makes first thing on the cluster
(``driver``).

Nothing here imports Ray at import time; ``jobs`` imports Ray's job client when it talks to
a head.
"""
