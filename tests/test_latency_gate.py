"""``single_row_latency_ms``, the latency gate's measurement: each call timed on the thread's CPU
clock (waiting for a core is not the model's cost), the least disturbed of its rounds counts; a
model that is slow stays slow."""

from __future__ import annotations

import time

import pandas as pd

from mlops.core.model_inputs import ModelInputs
from mlops.core.modeling import single_row_latency_ms

INPUTS = ModelInputs(numeric=("x",), categorical={})
ROWS = pd.DataFrame({"x": range(300)})


class Model:
    """A stand-in booster: ``stall_ms`` on every ``every``-th call among the first ``stalled_calls``."""

    def __init__(self, stall_ms: float, every: int, stalled_calls: int):
        self.stall_s, self.every, self.stalled_calls, self.calls = stall_ms / 1000, every, stalled_calls, 0

    def predict(self, matrix, num_threads=1):
        self.calls += 1
        if self.calls <= self.stalled_calls and self.calls % self.every == 0:
            end = time.thread_time() + self.stall_s  # busy: CPU the call uses
            while time.thread_time() < end:
                pass
        return [0.5] * len(matrix)


def test_a_burst_of_load_in_one_round_does_not_fail_a_fast_model():
    # 20 warm-up calls, then round 1 (300 calls): every 30th stalls 20 ms, ten in all, so its p99 is one
    model = Model(stall_ms=20, every=30, stalled_calls=320)
    latency = single_row_latency_ms(model, ROWS, inputs=INPUTS)
    assert latency["rounds"] == 3 and latency["p99_ms"] < 5, latency
    one_round = single_row_latency_ms(Model(stall_ms=20, every=30, stalled_calls=320), ROWS, inputs=INPUTS, rounds=1)
    assert one_round["p99_ms"] >= 20, one_round  # what a single round measured


def test_time_spent_off_the_cpu_is_not_the_models():
    class Waiting(Model):
        def predict(self, matrix, num_threads=1):
            time.sleep(0.012)  # preempted, or waiting for a core: wall time, no CPU
            return [0.5] * len(matrix)

    latency = single_row_latency_ms(Waiting(0, 1, 0), ROWS.head(40), repeats=40, inputs=INPUTS, rounds=1)
    assert latency["p99_ms"] < 5, latency


def test_a_model_slow_in_every_round_stays_slow():
    model = Model(stall_ms=15, every=20, stalled_calls=10**6)
    latency = single_row_latency_ms(model, ROWS, inputs=INPUTS)
    assert latency["p99_ms"] >= 15, latency
