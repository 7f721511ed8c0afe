"""Cost: what a row's work cost the engine, and the arithmetic to dollars.

A replica holds its devices from its start to its last completion. That time splits into
start-up, idle (no request in the engine), and busy. Busy time is charged to rows by the
work each did, not by when it ran: ``charge = a × prefill tokens + b × decode tokens``,
where prefill tokens are the prompt tokens the engine computed (its prefix cache served the
rest) and decode tokens are the generated ones. The weights ``a`` and ``b`` (seconds per
token) are measured by the run itself: every replica records windows of its busy time with
the tokens of the requests that finished in them (``Windows``), and ``fit`` solves
``busy ≈ a × prefill + b × decode`` by least squares over the windows in which the engine
was well filled. Busy time the charges do not account for is under-fill (the engine ran
below its full throughput: the draining tail, a starved engine) and is job overhead, like
start-up and idle. So, exactly: Σ row charges + under-fill + idle + start-up = the time the
replicas held their devices.

Where the run cannot tell prefill from decode cost (too few full windows, every window
with the same mix, or a fit that prices a prompt token above a generated one, which the
engine's work never does: it computes a prompt's tokens many to a step, generated tokens
one per sequence per step, so such a fit is noise), both weigh the same (``method:
tokens``): busy time per token of the full windows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# A window closes once it holds this much busy time and this many finished requests.
WINDOW_S = 2.0
WINDOW_REQUESTS = 8
# Windows whose mean requests in flight are at least this share of the best window's count
# as "well filled".
FULL_SHARE = 0.5
MIN_FULL_WINDOWS = 4


def usd(gpu_seconds: float, usd_per_gpu_hour: float) -> float:
    return gpu_seconds / 3600.0 * usd_per_gpu_hour


def per_million(cost_usd: float, tokens: int) -> float | None:
    """$ per 1M tokens; None when there were no tokens to divide by."""
    return cost_usd / (tokens / 1e6) if tokens else None


@dataclass(frozen=True)
class Weights:
    """Seconds of engine time per prefill token (``prefill_s``) and per decode token
    (``decode_s``), and how they were found."""

    prefill_s: float
    decode_s: float
    method: str  # "fit" | "tokens" | "busy" (no full window yet: busy time per token so far)
    windows: int = 0  # full windows the weights come from

    def charge(self, prefill_tokens: int, decode_tokens: int) -> float:
        return self.prefill_s * prefill_tokens + self.decode_s * decode_tokens

    def scaled(self, factor: float) -> Weights:
        return Weights(self.prefill_s * factor, self.decode_s * factor, self.method, self.windows)

    def to_dict(self) -> dict:
        return asdict(self)


class Windows:
    """A replica's record of its work, window by window: busy seconds, request-seconds in
    the engine (for how full it was), and the prefill and decode tokens of the requests
    that finished in the window. Fed on the engine loop's thread only."""

    def __init__(self, clock):
        self.clock = clock
        self.closed: list[tuple[float, float, int, int]] = []
        self._open()

    def _open(self) -> None:
        self.busy0, self.inflight0 = self.clock.busy, self.clock.inflight_s
        self.prefill = self.decode = self.requests = 0

    def add(self, prefill_tokens: int, decode_tokens: int) -> None:
        """One finished request (after the clock has counted its stop)."""
        self.prefill += prefill_tokens
        self.decode += decode_tokens
        self.requests += 1
        busy = self.clock.busy - self.busy0
        if busy >= WINDOW_S and self.requests >= WINDOW_REQUESTS:
            inflight = self.clock.inflight_s - self.inflight0
            self.closed.append((busy, inflight, self.prefill, self.decode))
            self._open()


def fit(windows: list[tuple[float, float, int, int]]) -> Weights | None:
    """Weights from the well-filled windows of a run (see the module docstring); None
    without any window."""
    import numpy as np

    if not windows:
        return None
    w = np.asarray(windows, dtype=float)
    busy, inflight, prefill, decode = w.T
    fill = np.divide(inflight, busy, out=np.zeros_like(busy), where=busy > 0)
    full = w[fill >= FULL_SHARE * fill.max()] if fill.max() > 0 else w
    busy, _, prefill, decode = full.T
    tokens = prefill.sum() + decode.sum()
    if tokens <= 0:
        return None
    per_token = float(busy.sum() / tokens)
    flat = Weights(per_token, per_token, "tokens", len(full))
    if len(full) < MIN_FULL_WINDOWS:
        return flat
    if decode.sum() == 0 or prefill.sum() == 0:  # one kind of token only (embed: prefill)
        return flat
    x = np.column_stack([prefill, decode])
    # Scaled columns, so that the condition number speaks of the mix, not of token units.
    norms = np.linalg.norm(x, axis=0)
    xs = x / norms
    if np.linalg.cond(xs) > 50:  # every window had about the same prefill:decode mix
        return flat
    coef, *_ = np.linalg.lstsq(xs, busy, rcond=None)
    a, b = coef / norms
    if a <= 0 or b <= 0 or a > b:
        return flat
    return Weights(float(a), float(b), "fit", len(full))


def fit_for_job(
    windows: list[tuple[float, float, int, int]],
    busy_s: float,
    prefill_tokens: int,
    decode_tokens: int,
) -> Weights:
    """The job's weights: ``fit`` over its replicas' windows, scaled down where needed so
    that the rows are never charged more than the engines' busy time (under-fill ≥ 0);
    without any window, busy time per token."""
    tokens = prefill_tokens + decode_tokens
    weights = fit(windows)
    if weights is None:
        per = busy_s / tokens if tokens else 0.0
        return Weights(per, per, "busy", 0)
    charged = weights.charge(prefill_tokens, decode_tokens)
    if charged > busy_s > 0:
        weights = weights.scaled(busy_s / charged)
    return weights
