"""The signals of one shutdown: the first lets in-flight requests finish for the grace period;
a second one while they still drain ends that wait at once (it was ignored in silence for the
whole grace period, as a probe pressing Ctrl-C twice found)."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass

log = logging.getLogger("inlaid.coordinator")


@dataclass
class ShutdownSignals:
    received: int = 0
    drained: bool = False  # the grace period is over: a signal now changes nothing
    stop_now: bool = False

    def on_signal(self, signum: int, in_flight: int) -> None:
        self.received += 1
        if self.received >= 2 and not self.drained and not self.stop_now:
            log.warning("second signal: stopping now; in-flight requests fail with shutting_down",
                        extra={"signal": signal.Signals(signum).name, "in_flight": in_flight})
            self.stop_now = True
