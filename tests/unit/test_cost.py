"""Cost attribution by work (cost.py): the fit of what a prefill and a decode token cost,
and the invariant Σ charges + under-fill + idle + start-up = held time, on synthetic
engine timelines."""

from __future__ import annotations

import numpy as np
import pytest

from batchjobs.actor import BusyClock
from batchjobs.cost import Weights, Windows, fit, fit_for_job

A, B = 0.0004, 0.02  # "true" seconds per prefill and per decode token


def _full_windows(n: int, seed: int = 0) -> list[tuple[float, float, int, int]]:
    """Windows of a full engine (64 requests in flight) whose time is A × prefill + B ×
    decode, with a varying mix and 2 % noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, d = int(rng.integers(1_000, 20_000)), int(rng.integers(100, 1_000))
        busy = (A * p + B * d) * rng.normal(1.0, 0.02)
        out.append((busy, 64 * busy, p, d))
    return out


def test_fit_recovers_the_weights_from_full_windows():
    w = fit(_full_windows(40))
    assert w.method == "fit" and w.windows == 40
    assert w.prefill_s == pytest.approx(A, rel=0.1)
    assert w.decode_s == pytest.approx(B, rel=0.05)


def test_under_filled_windows_do_not_move_the_fit():
    full = _full_windows(40)
    # the draining tail: two requests in flight, four times slower per token
    tail = [(4 * (A * 500 + B * 50), 2 * 4 * (A * 500 + B * 50), 500, 50)] * 10
    assert fit(full + tail) == fit(full)


def test_one_mix_everywhere_weighs_both_kinds_of_token_alike():
    # every window with prefill = 10 × decode: the run cannot tell the two apart
    windows = [(A * 10 * d + B * d, 64.0, 10 * d, d) for d in (100, 200, 300, 400, 500)]
    w = fit(windows)
    per_token = sum(x[0] for x in windows) / sum(x[2] + x[3] for x in windows)
    assert w.method == "tokens" and w.prefill_s == w.decode_s == pytest.approx(per_token)


def test_prefill_only_runs_charge_prompt_tokens_alone():
    windows = [(A * p, 64 * A * p, p, 0) for p in (1000, 2000, 3000, 4000, 5000)]
    w = fit(windows)
    assert w.charge(7000, 0) == pytest.approx(A * 7000)


def test_no_window_charges_busy_time_per_token():
    w = fit_for_job([], busy_s=10.0, prefill_tokens=600, decode_tokens=400)
    assert w.method == "busy" and w.charge(600, 400) == pytest.approx(10.0)


def test_weights_are_scaled_so_rows_never_cost_more_than_busy_time():
    w = fit_for_job(_full_windows(40), busy_s=1.0, prefill_tokens=100_000, decode_tokens=10_000)
    assert w.charge(100_000, 10_000) == pytest.approx(1.0)


def test_windows_close_on_busy_time_and_requests():
    clock = BusyClock(0.0)
    windows = Windows(clock)
    t = 0.0
    for _ in range(20):  # one request at a time, 0.25 s each
        clock.start(t)
        t += 0.25
        clock.stop(t)
        windows.add(100, 10)
    # a window needs >= 2 s busy and >= 8 requests: 8 requests of 0.25 s each
    assert [round(w[0], 6) for w in windows.closed] == [2.0, 2.0]
    assert windows.closed[0][2:] == (800, 80)
    assert windows.closed[0][1] == pytest.approx(2.0)  # one request in flight throughout


def test_a_request_alone_at_the_end_pays_its_work_and_the_rest_is_under_fill():
    """A replica's timeline: 3 s start-up, 1 s idle, 60 s of full engine, then one long
    request alone for 30 s. Charges by work; the tail's time beyond its work is under-fill;
    the parts add up to the time the replica held its device."""
    startup, idle = 3.0, 1.0
    full = _full_windows(30, seed=1)
    full_busy = sum(w[0] for w in full)
    tail_p, tail_d, tail_s = 200, 400, 30.0  # its work is A*200 + B*400 = 8.08 s
    busy = full_busy + tail_s
    prefill = sum(w[2] for w in full) + tail_p
    decode = sum(w[3] for w in full) + tail_d
    weights = fit_for_job(full + [(tail_s, tail_s, tail_p, tail_d)], busy, prefill, decode)
    assert weights.method == "fit"
    tail_charge = weights.charge(tail_p, tail_d)
    assert tail_charge == pytest.approx(A * tail_p + B * tail_d, rel=0.1)
    charges = [weights.charge(w[2], w[3]) for w in full] + [tail_charge]
    underfill = busy - sum(charges)
    assert underfill == pytest.approx(tail_s - tail_charge, abs=0.05 * full_busy)
    assert sum(charges) + underfill + idle + startup == pytest.approx(startup + idle + busy)


def test_weights_round_trip_through_the_manifest_dict():
    w = Weights(0.001, 0.01, "fit", 12)
    assert Weights(**w.to_dict()) == w


def test_a_fit_that_prices_prompt_tokens_above_generated_ones_is_not_used():
    # windows as a noisy, loaded machine gave them: prefill looks dearer than decode
    rng = np.random.default_rng(2)
    windows = []
    for _ in range(20):
        p, d = int(rng.integers(100, 2_000)), int(rng.integers(100, 1_000))
        busy = 0.003 * p + 0.001 * d
        windows.append((busy, 8 * busy, p, d))
    w = fit(windows)
    per_token = sum(x[0] for x in windows) / sum(x[2] + x[3] for x in windows)
    assert w.method == "tokens" and w.prefill_s == w.decode_s == pytest.approx(per_token)
