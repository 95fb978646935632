"""``BrainFlowSource``: any BrainFlow board (synthetic board -1 included) feeding the ring.

Timestamp mapping: BrainFlow stamps each sample in its timestamp channel with
the host's wall clock (Unix seconds, taken by BrainFlow's reader thread). We
map them to the session clock with one offset, ``pylsl.local_clock() -
time.time()``, measured when the stream starts (the two reads are back to
back, microseconds apart) and re-measured every ``offset_refresh_s``. This
keeps BrainFlow's own per-sample timing (including its acquisition lag) and
assumes the wall clock is not stepped during a session (NTP slewing is slow
enough to be absorbed by the refresh).

Drop detection uses timestamp gaps like ``LslSource``, but host-stamped
timestamps jitter: the synthetic board showed steps up to 2.25 sample periods
without any loss (3 s at 250 Hz, p99.9 = 2.2 periods), hence ``gap_factor=2.5``
(``HOST_STAMPED_GAP_FACTOR``; ``SourceInfo.gap_factor`` passes it on to the loop's data-quality check
and the export, which would otherwise take those steps for lost samples).

A board that stops delivering (unplugged, firmware hang) raises nothing in
BrainFlow: its buffer just stays empty. As ``LslSource``, no data for
``stall_timeout_s`` is reported once as ``FAULT stream_lost`` and data coming
back as ``STATUS stream_recovered``.
"""
from __future__ import annotations

import os
import time

import numpy as np

from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()  # pylsl (used only for local_clock) must see the loopback config when it loads
import pylsl  # noqa: E402
from brainflow.board_shim import BoardShim, BrainFlowError, BrainFlowInputParams

from controller.events import EventKind
from controller.sources.base import HOST_STAMPED_GAP_FACTOR, Source, SourceError, SourceInfo, count_gaps

_CHANNEL_GETTERS = {
    "exg": BoardShim.get_exg_channels, "eeg": BoardShim.get_eeg_channels, "emg": BoardShim.get_emg_channels,
    "ecg": BoardShim.get_ecg_channels, "eog": BoardShim.get_eog_channels,
}


_NO_BOARD_ID = -987_654   # no BrainFlow board has this id (see close())


class BrainFlowSource(Source):
    """Reads a BrainFlow board with ``get_board_data`` on every read.

    ``params``: any ``BrainFlowInputParams`` fields (``serial_port``,
    ``ip_address``, ``file``, ...). ``channels``: ``"exg"`` (default), ``"eeg"``,
    ``"emg"``, ``"ecg"``, ``"eog"``, or an explicit list of row indices.
    When the board has nothing, a read sleeps ``wait_s``; with ``busy_poll`` it
    keeps asking for up to ``wait_s`` instead (a CPU core for less latency, as
    ``LslSource``'s). ``ring_buffer_samples``: BrainFlow's own buffer (1 to
    21 600 000 samples, BrainFlow's limit). No data for ``stall_timeout_s`` →
    ``FAULT stream_lost`` (once per stall); data again → ``STATUS stream_recovered``.
    """

    event_source = "brainflow"

    def __init__(self, board_id: int, params: dict | None = None, channels: str | list[int] = "exg",
                 wait_s: float = 0.005, ring_buffer_samples: int = 45_000, gap_factor: float = HOST_STAMPED_GAP_FACTOR,
                 offset_refresh_s: float = 10.0, quiet: bool = True, busy_poll: bool = False,
                 stall_timeout_s: float = 1.0):
        super().__init__()
        self.board_id = int(board_id)
        self.params = dict(params or {})
        known = {k for k in dir(BrainFlowInputParams()) if not k.startswith("_") and k != "to_json"}
        unknown = set(self.params) - known
        if unknown:
            raise ValueError(f"BrainFlowSource params {sorted(unknown)}: not BrainFlowInputParams fields; "
                             f"expected some of {sorted(known)}")
        self.channels = channels
        self.wait_s = float(wait_s)
        # Checked here: BrainFlow only refuses it in start_stream, after the session is prepared.
        if isinstance(ring_buffer_samples, bool) or int(ring_buffer_samples) != ring_buffer_samples \
                or ring_buffer_samples < 1:
            raise ValueError(f"BrainFlowSource ring_buffer_samples={ring_buffer_samples!r}: expected an integer "
                             f">= 1 (samples BrainFlow buffers between reads)")
        self.ring_buffer_samples = int(ring_buffer_samples)
        if not (stall_timeout_s > 0 and np.isfinite(stall_timeout_s)):
            raise ValueError(f"BrainFlowSource stall_timeout_s={stall_timeout_s!r}: expected a finite number > 0")
        self.stall_timeout_s = float(stall_timeout_s)
        self.gap_factor = float(gap_factor)
        self.offset_refresh_s = float(offset_refresh_s)
        self.quiet = quiet
        if not isinstance(busy_poll, bool):
            raise ValueError(f"BrainFlowSource busy_poll={busy_poll!r}: expected true or false")
        self.busy_poll = busy_poll
        self._board: BoardShim | None = None
        self._rows: list[int] = []
        self._ts_row = -1
        self._offset_s = 0.0
        self._next_offset_t = 0.0
        self._last_ts: float | None = None
        self._last_data_t = 0.0
        self._lost_since: float | None = None
        self.n_samples = 0
        self.n_dropped = 0
        self.n_lost_events = 0

    def open(self) -> SourceInfo:
        if self.quiet:
            BoardShim.disable_board_logger()
        bf_params = BrainFlowInputParams()
        for key, value in self.params.items():
            setattr(bf_params, key, value)
        try:
            descr = BoardShim.get_board_descr(self.board_id)
            if isinstance(self.channels, str):
                getter = _CHANNEL_GETTERS.get(self.channels)
                if getter is None:
                    raise ValueError(f"BrainFlowSource channels={self.channels!r}: expected one of "
                                     f"{sorted(_CHANNEL_GETTERS)} or a list of row indices")
                rows = list(getter(self.board_id))
            else:
                rows = [int(r) for r in self.channels]
            n_rows = BoardShim.get_num_rows(self.board_id)
            bad = [r for r in rows if not 0 <= r < n_rows]
            if bad or not rows:
                raise ValueError(f"BrainFlowSource channels {rows}: expected a non-empty list of rows in "
                                 f"[0, {n_rows}) for board {self.board_id}")
            self._rows = rows
            self._ts_row = BoardShim.get_timestamp_channel(self.board_id)
            fs_hz = float(BoardShim.get_sampling_rate(self.board_id))
            board = BoardShim(self.board_id, bf_params)
        except BrainFlowError as exc:
            raise SourceError(f"BrainFlow board {self.board_id} with params {self.params}: {exc}") from exc
        prepared = False
        try:
            board.prepare_session()
            prepared = True
            board.start_stream(self.ring_buffer_samples)
        except BaseException as exc:
            if prepared:
                # A prepared session that is not released keeps the board: every later open of it
                # (this source retried, the session restarted) would fail with ANOTHER_BOARD_IS_CREATED.
                _release(board)
            else:
                # Not ours (e.g. another source holds this board): releasing by board id and params
                # would end that one's session, here or in this object's __del__.
                board.board_id = _NO_BOARD_ID
            if isinstance(exc, BrainFlowError):
                raise SourceError(f"BrainFlow board {self.board_id} with params {self.params}: {exc}") from exc
            raise
        self._board = board
        self._refresh_offset()
        self._last_data_t = pylsl.local_clock()   # the stall clock starts with the stream
        self._lost_since = None
        names_all = descr.get("eeg_names", "").split(",") if descr.get("eeg_names") else []
        eeg_rows = descr.get("eeg_channels", [])
        names = [names_all[eeg_rows.index(r)] if r in eeg_rows and eeg_rows.index(r) < len(names_all)
                 else f"row{r}" for r in rows]
        # BrainFlow gives EXG rows (EEG, EMG, ECG, EOG) in µV; a row picked from elsewhere (accelerometer
        # in g, temperature, battery) is in its own unit, so it is left undeclared, not called µV.
        exg = {r for key in ("eeg_channels", "emg_channels", "ecg_channels", "eog_channels")
               for r in descr.get(key, [])}
        self.info = SourceInfo(name=str(descr.get("name", f"board{self.board_id}")), type="EXG",
                               source_id=f"brainflow:{self.board_id}", n_channels=len(rows),
                               channel_names=tuple(names), units=tuple("uV" if r in exg else "" for r in rows),
                               fs_hz=fs_hz, gap_factor=self.gap_factor)
        return self.info

    def _refresh_offset(self) -> None:
        self._offset_s = pylsl.local_clock() - time.time()
        self._next_offset_t = pylsl.local_clock() + self.offset_refresh_s

    def read_into(self, ring) -> int:
        """Move everything the board buffered into ``ring`` (waits ``wait_s`` when empty)."""
        board = self._board
        if board is None or self.info is None:
            raise SourceError("BrainFlowSource: open() before read_into()")
        self.check_ring(ring)
        try:
            if board.get_board_data_count() == 0:
                if self.busy_poll:
                    give_up = time.monotonic() + self.wait_s
                    while board.get_board_data_count() == 0 and time.monotonic() < give_up:
                        os.sched_yield()   # as LslSource's busy poll: other runnable tasks go first
                else:
                    time.sleep(self.wait_s)  # BrainFlow has no blocking read: a short sleep
            data = board.get_board_data()  # (rows, n) float64, removed from BrainFlow's buffer
        except BrainFlowError as exc:
            raise SourceError(f"BrainFlow board {self.board_id}: read failed: {exc}") from exc
        n = data.shape[1]
        if n == 0:
            if self._lost_since is None:
                now = pylsl.local_clock()
                if now - self._last_data_t > self.stall_timeout_s:
                    self._lost_since = now
                    self.n_lost_events += 1
                    self._emit(now, EventKind.FAULT, what="stream_lost", reason="stall", board_id=self.board_id,
                               last_data_t=self._last_data_t)
            return 0
        now = pylsl.local_clock()
        if self._lost_since is not None:
            self._emit(now, EventKind.STATUS, what="stream_recovered", how="data_resumed", board_id=self.board_id,
                       outage_s=now - self._lost_since)
            self._lost_since = None
        self._last_data_t = now
        if now >= self._next_offset_t:
            self._refresh_offset()
        ts = data[self._ts_row] + self._offset_s
        n_gaps, n_lost, t_gap = count_gaps(ts, self._last_ts, self.info.fs_hz, self.gap_factor)
        if n_gaps:
            self.n_dropped += n_lost
            self._emit(now, EventKind.DROPPED, n_lost=n_lost, n_gaps=n_gaps, at_t=t_gap, reason="timestamp_gap")
        samples = data[self._rows].T.astype(np.float32)  # one vectorized (rows→sample-major) copy per chunk
        written = 0
        while written < n:  # a chunk larger than the ring (long stall) goes in ring-sized pieces
            k = min(n - written, ring.capacity)
            ring.write(samples[written:written + k], ts[written:written + k])
            written += k
        self._last_ts = float(ts[-1])
        self.n_samples += n
        return n

    def close(self) -> None:
        board, self._board = self._board, None
        if board is not None:
            _release(board)


def _release(board: BoardShim) -> None:
    """Stop the stream (if any) and release the session, whatever state the board is in."""
    try:
        board.stop_stream()
    except BrainFlowError:
        pass  # never started, already stopped or the device went away: releasing the session is what matters
    try:
        board.release_session()
    except BrainFlowError:
        pass
    # BoardShim.__del__ releases the session of its (board id, params), whichever object opened
    # it. BrainFlow's first call keeps its callers' frames alive until a garbage collection, so a
    # closed board object can die later, in the middle of a newer source's session on the same
    # board: it released that session (seen as BOARD_NOT_CREATED a few reads after opening).
    # A released object points at no board, so its __del__ finds nothing to release.
    board.board_id = _NO_BOARD_ID
