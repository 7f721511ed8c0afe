"""Developer tools that are not part of a job's run: nothing in the runtime imports them."""
