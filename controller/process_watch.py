"""Child processes end with their parent: a killed runner must not leave orphans stimulating or recording."""
from __future__ import annotations

import os
import threading
import time


def stop_when_parent_dies(stop_event, interval_s: float = 0.25) -> threading.Thread:
    """Set ``stop_event`` once the parent process is gone (reparented), so the child shuts down cleanly.

    A daemon thread polling ``os.getppid()``: portable, and the child still runs its own orderly
    shutdown (stimulation off, files flushed) instead of being killed outright. It touches the
    (cross-process, lock-protected) event only once the parent is gone: a daemon thread that dies
    inside ``Event.wait`` at process exit would leave the event's lock taken and deadlock the parent.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                stop_event.set()
                return

    t = threading.Thread(target=watch, name="parent-watch", daemon=True)
    t.start()
    return t
