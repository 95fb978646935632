"""The loop's wake-up pipe (controller.wakeup): wakes on a write, times out otherwise, never blocks the writer."""
import os
import time

import pytest

from controller.wakeup import WakeupReader, WakeupWriter, make_wakeup


def test_a_write_wakes_the_reader_and_silence_times_out(tmp_path):
    path = make_wakeup(tmp_path / "w")
    reader, writer = WakeupReader(path), WakeupWriter(path)
    try:
        t0 = time.monotonic()
        assert reader.wait(0.05) is False
        assert time.monotonic() - t0 >= 0.04
        writer.notify()
        writer.notify()
        assert reader.wait(1.0) is True
        assert reader.wait(0.01) is False   # drained: two pokes are one wake-up
    finally:
        writer.close()
        reader.close()


def test_a_full_pipe_does_not_block_or_raise(tmp_path):
    path = make_wakeup(tmp_path / "w")
    reader, writer = WakeupReader(path), WakeupWriter(path)
    try:
        for _ in range(200_000):   # far more than a pipe's 64 KiB
            writer.notify()
        assert reader.wait(0.1) is True
    finally:
        writer.close()
        reader.close()


def test_the_reader_removes_the_pipe_so_a_killed_runner_leaves_nothing_behind(tmp_path):
    path = make_wakeup(tmp_path / "w")
    reader, writer = WakeupReader(path), WakeupWriter(path)
    reader.close()
    assert not os.path.exists(path)
    writer.notify()   # the writer's open pipe still works after the name is gone
    writer.close()
    reader.close()    # twice is fine


def test_make_wakeup_refuses_a_path_that_is_not_a_pipe(tmp_path):
    f = tmp_path / "plain"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="not a named pipe"):
        make_wakeup(f)
    assert make_wakeup(make_wakeup(tmp_path / "p")) == tmp_path / "p"   # an existing pipe is reused
