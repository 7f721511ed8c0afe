"""How many rows must an engine replica hold to keep a continuous-batching engine full?

A step simulation, not a measurement: the engine runs up to ``--slots`` requests, each
step gives every running request one token, and waiting requests fill free slots in
order (as vLLM's FCFS scheduler does). The replica holds ``batches`` Ray Data batches of
``batch`` rows; a batch goes back (and a new one comes in) only when its last row is done.
Raw ``LLM.generate`` submits every prompt at once. Printed: steps to finish the job and
the ratio raw / replica (1.0 = as fast as raw), for output lengths 64/256/512/1536 with
weights 50/30/15/5 (the long-tailed workload of bench.py).

    python bench/inflight_sim.py --rows 20000 --slots 1024

Step time is taken as constant, which overstates the loss on a real engine (a smaller
decode batch runs faster per step), so use it for the shape, and bench.py for numbers.
"""

from __future__ import annotations

import argparse
import collections
import random


def lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choices([64, 256, 512, 1536], weights=[50, 30, 15, 5])[0] for _ in range(n)]


def steps_to_finish(out_len: list[int], slots: int, batch: int, batches: int) -> int:
    """Engine steps until every row is done, the replica holding ``batches`` × ``batch`` rows."""
    n = len(out_len)
    todo = collections.deque(range(0, n, batch))  # first row of each batch not yet handed over
    left: dict[int, int] = {}  # batch start -> rows not done
    waiting: collections.deque[int] = collections.deque()  # rows held, not yet running
    running: dict[int, int] = {}  # row -> tokens to go
    held = steps = done = 0
    while done < n:
        while held < batches and todo:
            start = todo.popleft()
            rows = range(start, min(start + batch, n))
            left[start] = len(rows)
            waiting.extend(rows)
            held += 1
        while waiting and len(running) < slots:
            row = waiting.popleft()
            running[row] = out_len[row]
        steps += 1
        for row in list(running):
            running[row] -= 1
            if not running[row]:
                del running[row]
                done += 1
                start = row - row % batch
                left[start] -= 1
                if not left[start]:
                    held -= 1
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--slots", type=int, default=1024, help="engine max_num_seqs")
    p.add_argument("--scale", type=float, default=1.0, help="output length scale")
    a = p.parse_args()
    out_len = [max(1, int(x * a.scale)) for x in lengths(a.rows)]
    raw = steps_to_finish(out_len, a.slots, a.rows, 1)
    print(f"raw LLM.generate: {raw} steps ({a.rows} rows, {a.slots} slots)")
    print(f"{'batch':>6} {'batches':>8} {'rows held':>10} {'steps':>8} {'vs raw':>7}")
    for batch, batches in [(32, 16), (64, 32), (64, 64), (64, 128), (32, 256), (64, 256)]:
        s = steps_to_finish(out_len, a.slots, batch, batches)
        print(f"{batch:>6} {batches:>8} {batch * batches:>10} {s:>8} {raw / s:>7.3f}")


if __name__ == "__main__":
    main()
