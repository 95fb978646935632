"""Child processes end with their parent: a killed runner must not leave orphans stimulating or recording."""
from __future__ import annotations

import os
import threading


def stop_when_parent_dies(stop_event, interval_s: float = 0.25) -> threading.Thread:
    """Set ``stop_event`` once the parent process is gone (reparented), so the child shuts down cleanly.

    A daemon thread polling ``os.getppid()``: portable, and the child still runs its own orderly
    shutdown (stimulation off, files flushed) instead of being killed outright.
    """
    parent = os.getppid()

    def watch() -> None:
        while not stop_event.wait(interval_s):
            if os.getppid() != parent:
                stop_event.set()
                return

    t = threading.Thread(target=watch, name="parent-watch", daemon=True)
    t.start()
    return t
