"""The thread count of training steps on a CPU: all of torch's threads or one, as measured."""

from __future__ import annotations

import time

import torch


class WorkerCount:
    """How many threads the next piece of repeated work (a training step) runs on, chosen by what
    the earlier ones measured.

    On a quiet machine all of ``torch.get_num_threads()`` win; on a busy one (DataLoader workers,
    other jobs on the cores) each of torch's OpenMP regions waits for whichever thread the
    scheduler has not run, and one thread can be several times faster. The first four pieces
    alternate between all threads and one; then the faster by the median of its last five runs'
    seconds runs (a run on a busy machine is sometimes preempted and sometimes lucky: the median
    ignores both), and the other is tried once every ``interval`` runs (16, then 32 while the choice
    holds; at once again while the tries beat the choice), so a change of load is noticed within a
    few dozen steps.
    """

    def __init__(self) -> None:
        self.recent: dict[int, list[float]] = {}  # the last five seconds per thread count
        self.best = 0
        self.interval = 16
        self.since = 0
        self.exploring = 0

    def pick(self, many: int | None = None) -> int:
        """The thread count of the next run (a step): ``many`` (default ``torch.get_num_threads()``) or one."""
        many = torch.get_num_threads() if many is None else many
        if many <= 1:
            return 1
        options = (many, 1)
        done = sum(len(self.recent.get(t, ())) for t in options)
        if done < 4:  # the warm-up: many, 1, many, 1
            return options[done % 2]
        best = self.faster(many)
        if best != self.best:
            self.best, self.interval, self.since = best, 16, 0
        self.since += 1
        if self.since >= self.interval:
            self.since, self.interval = 0, min(2 * self.interval, 32)
            self.exploring = options[1 - options.index(best)]
            return self.exploring
        return best

    def faster(self, many: int) -> int:
        """``many`` or one, whichever the recent runs measured faster (``many`` before any)."""
        return min((many, 1), key=self.typical)

    def typical(self, threads: int) -> float:
        """The median of the last five runs on ``threads`` (inf before any)."""
        times = sorted(self.recent.get(threads, ()))
        return times[len(times) // 2] if times else float("inf")

    def record(self, threads: int, seconds: float) -> None:
        self.recent[threads] = (self.recent.get(threads, []) + [seconds])[-5:]
        if threads == self.exploring:
            self.exploring = 0
            if seconds < self.typical(self.best):  # promising: try it again at once (its window is old)
                self.since = self.interval


class StepThreads:
    """torch's thread count over a run: ``threads`` > 0 fixes it; 0 chooses, step by step, between
    ``torch.get_num_threads()`` and one by the steps' measured time (``WorkerCount``). On a busy CPU
    (DataLoader workers, other jobs) every parallel region of the model's small operations waits
    for whichever thread the scheduler has not run, and one thread can be several times faster;
    on a quiet one all threads win. Relabelling and evaluation (scikit-learn's thread pools too) run
    on the count measured faster.
    A chosen count follows the load, so bit-for-bit repeatable runs need ``threads`` > 0."""

    def __init__(self, threads: int, device: torch.device) -> None:
        self.restore = torch.get_num_threads()
        self.many = threads or self.restore
        self.count = WorkerCount() if threads == 0 and device.type == "cpu" and self.many > 1 else None
        self.now, self.start = self.many, 0.0

    def _set(self, n: int) -> None:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def begin(self) -> None:
        """Set the count of the next training step and start its clock."""
        self.now = self.count.pick(self.many) if self.count is not None else self.many
        self._set(self.now)
        self.start = time.perf_counter()

    def end(self) -> None:
        """Stop the step's clock."""
        if self.count is not None:
            self.count.record(self.now, time.perf_counter() - self.start)

    def best(self) -> None:
        """Set the count measured faster (``threads`` when fixed) for work outside the steps."""
        self._set(self.many if self.count is None else self.count.faster(self.many))

    def close(self) -> None:
        torch.set_num_threads(self.restore)
