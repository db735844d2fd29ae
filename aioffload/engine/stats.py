"""Engine step statistics: counters for /metrics, the periodic throughput log line, and the
recent-steps record the dashboard (`GET /v1/dashboard`) reads.

The record is a bounded deque of one tuple per step, `STEP_FIELDS` wide (plus any
`extra_fields` a feature adds, e.g. a host share or an acceptance length). It is appended
and read on the event loop's thread only, so readers take no lock and the step never waits.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque

from aioffload.engine.scheduler import StepPlan

log = logging.getLogger("aioffload.engine")


STEP_FIELDS = ("t", "step_ms", "tokens", "seqs")  # wall-clock end (s), duration, tokens computed, sequences
RECENT_STEPS = 4096  # about 20 s of 5 ms resident steps, 13 min of 200 ms streamed ones


class StepStats:
    """Counters for /metrics, the periodic throughput log line and the recent-steps record."""

    def __init__(self, log_interval_s: float = 5.0, recent_steps: int = RECENT_STEPS,
                 extra_fields: tuple[str, ...] = ()) -> None:
        self.step_fields = STEP_FIELDS + extra_fields
        self.recent: deque[tuple[float, ...]] = deque(maxlen=recent_steps)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps_total = 0
        # Speculative decoding: proposals verified, accepted, and tokens emitted by the sequence-steps
        # that verified some (accepted + the target's own, up to a stop); one verification per such step.
        self.spec_proposed_total = 0
        self.spec_accepted_total = 0
        self.spec_emitted_total = 0
        self.spec_verifications_total = 0
        self.step_time_ema = 0.0
        self.log_interval_s = log_interval_s
        self._last_log = time.monotonic()
        self._last_prompt = 0
        self._last_gen = 0
        self._last_spec = (0, 0)  # (emitted, verifications) at the last log line

    def record_step(self, plan: StepPlan, seconds: float, extra: tuple[float, ...] = ()) -> None:
        """Count one finished step; `extra` holds one value per `extra_fields` name."""
        tokens = 0
        for req in plan.requests:
            n = plan.num_scheduled_tokens[req.request_id]
            tokens += n
            # Positions of the prompt, and outputs recomputed after a preemption, are prompt work;
            # only the newest token's position is generation.
            c = req.num_computed_tokens
            self.prompt_tokens_total += max(0, min(c + n, max(req.num_prompt_tokens, req.num_tokens - 1)) - c)
        self.steps_total += 1
        self.step_time_ema = seconds if self.steps_total == 1 else 0.9 * self.step_time_ema + 0.1 * seconds
        self.recent.append((time.time(), seconds * 1e3, tokens, len(plan.requests), *extra))

    def steps_since(self, step: int) -> tuple[int, list[tuple[float, ...]]]:
        """(steps_total, the recorded steps numbered after `step`, oldest first); steps are
        numbered 1, 2, ... and only the last `recent.maxlen` are kept."""
        total = self.steps_total
        n = min(max(0, total - step), len(self.recent))
        return total, list(itertools.islice(reversed(self.recent), n))[::-1]

    def record_verification(self, proposed: int, accepted: int, emitted: int) -> None:
        self.spec_proposed_total += proposed
        self.spec_accepted_total += accepted
        self.spec_emitted_total += emitted
        self.spec_verifications_total += 1

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verifying sequence-step (1 = nothing accepted), over the whole run."""
        return self.spec_emitted_total / self.spec_verifications_total if self.spec_verifications_total else 0.0

    def copy_busy_fraction(self, bytes_per_step: int, h2d_bytes_per_s: float) -> float:
        if not bytes_per_step or not self.step_time_ema:
            return 0.0
        return min(1.0, bytes_per_step / h2d_bytes_per_s / self.step_time_ema)

    def maybe_log(self, num_running: int, num_waiting: int, kv_usage: float) -> None:
        """Every `log_interval_s`, one throughput line (skipped while idle)."""
        now = time.monotonic()
        dt = now - self._last_log
        if dt < self.log_interval_s:
            return
        p = (self.prompt_tokens_total - self._last_prompt) / dt
        g = (self.generation_tokens_total - self._last_gen) / dt
        emitted = self.spec_emitted_total - self._last_spec[0]
        verifications = self.spec_verifications_total - self._last_spec[1]
        spec = f", mean accepted length {emitted / verifications:.2f}" if verifications else ""
        if p or g or num_running or num_waiting:
            log.info(
                "prompt throughput %.1f tok/s, generation throughput %.1f tok/s, running %d, waiting %d, "
                "KV usage %.1f%%%s",
                p, g, num_running, num_waiting, kv_usage * 100, spec,
            )  # fmt: skip
        self._last_log, self._last_prompt, self._last_gen = now, self.prompt_tokens_total, self.generation_tokens_total
        self._last_spec = (self.spec_emitted_total, self.spec_verifications_total)
