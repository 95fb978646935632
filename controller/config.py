"""The one TOML configuration file, validated with pydantic.

Every field has a documented unit and range. ``load_config`` turns pydantic's
errors into one readable message per problem: field, value, allowed range.
"""
from __future__ import annotations

import copy
import tomllib
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from controller.low_latency import DEFAULT_NICE
from hil_sim.faults import FaultSpec  # noqa: E402  (plain pydantic model; no I/O at import)

DEFAULTS_PATH = Path(__file__).with_name("defaults.toml")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message lists every problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SessionConfig(_Section):
    duration_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600, description="session length, s")] = 60.0
    out_dir: str = Field("sessions", description="parent folder of session folders")
    seed: Annotated[int, Field(ge=0)] = 0
    low_latency: bool = Field(True, description=(
        "hold a PM QoS request (/dev/cpu_dma_latency = 0) while the session runs: idle CPUs poll instead of "
        "halting, so chunks and commands are not delayed by wake-ups (as cyclictest does by default; costs "
        "idle-CPU power; needs write access, without it the session runs and says so; controller/low_latency.py)"))
    nice: Annotated[int, Field(ge=-20, le=19, description=(
        "scheduling priority of the controller's processes (acquisition, loop): -20 highest .. 19; below 0 "
        "needs root or CAP_SYS_NICE, without it the session runs at its inherited priority and says so. "
        "The simulator keeps its own, and so does a busy-polling acquisition (source.busy_poll). "
        "controller/low_latency.py, docs/performance_log.md 'Priority'"))] = DEFAULT_NICE


class SourceConfig(_Section):
    kind: Literal["hil", "lsl", "brainflow"] = "hil"
    stream: str = Field("stimloop-sim", description="LSL stream name to resolve")
    stream_type: str = Field("", description="LSL stream type to resolve (empty: any)")
    source_id: str = Field("", description="LSL source id to resolve (empty: any)")
    resolve_timeout_s: Annotated[float, Field(gt=0, le=120)] = 5.0
    max_buflen_s: Annotated[int, Field(ge=1, le=60, description=(
        "pylsl inlet buffer, s: the longest stall whose backlog is kept (a 2 s hiccup lost half its samples "
        "with 1 s); not pylsl's 360 s, whose lag would hide (REFERENCE §1), and lag cannot hide here: "
        "windows are timed by their samples' timestamps, late ones recorded and not acted on"))] = 10
    stall_timeout_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    busy_poll: bool = Field(False, description=(
        "wait for samples by polling without sleeping: less latency and jitter, one CPU core spent by the "
        "acquisition process (docs/performance_log.md, 'Busy polling'); for a machine with a core to spare"))
    units: str = Field("", description=(
        "LSL: the unit every channel's values are in (V, mV, uV, nV), whatever the stream declares; empty: "
        "the stream's own declaration (V, mV, nV converted to µV; none declared: taken as µV; any other refused)"))
    board_id: int = Field(-1, description="BrainFlow board id (-1 = synthetic board)")
    board_params: dict[str, Any] = Field(default_factory=dict, description="BrainFlowInputParams fields")

    @field_validator("units")
    @classmethod
    def _units_known(cls, v: str) -> str:
        from controller.units import KNOWN_UNITS, uv_factor
        if v and uv_factor(v) is None:
            raise ValueError(f"not a voltage unit stimloop knows: expected one of {', '.join(KNOWN_UNITS)}, "
                             "or empty for the stream's own")
        return v

    @model_validator(mode="after")
    def _units_for_lsl(self) -> "SourceConfig":
        if self.units and self.kind == "brainflow":
            raise ValueError("units applies to LSL streams: BrainFlow boards deliver µV")
        return self


class SimulatorConfig(_Section):
    model: Literal["wendling", "spiking"] = Field("wendling", description=(
        "wendling: iEEG with seizures (neural mass); spiking: 30 kHz spiking units with an STDP synapse, "
        "for ADS/random sessions (hil_sim/spiking.py; needs fs_hz >= 10000)"))
    fs_hz: Annotated[float, Field(gt=50, le=50_000)] = 512.0
    n_channels: Annotated[int, Field(ge=1, le=256)] = 16
    patient: Annotated[int, Field(ge=0)] = 0
    seizure_onsets_s: list[Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: [10.0, 30.0, 50.0])
    spontaneous_seizures: bool = False
    seizure_rate_per_hour: Annotated[float | None, Field(gt=0, le=120, description=(
        "spontaneous seizure rate; empty: the virtual patient's own (hil_sim/cohort.py)"))] = None
    alpha_uv: Annotated[float, Field(ge=0, le=1000, description=(
        "rms µV of an alpha-like rhythm at alpha_hz on every channel (the Wendling background has no peak); "
        "0: off, as the seizure model's training cohort"))] = 0.0
    alpha_hz: Annotated[float, Field(ge=2, le=100)] = 10.0
    chunk_s: Annotated[float, Field(gt=0, le=0.5)] = 1 / 64
    stim_latency_ms: Annotated[float, Field(ge=0, le=1000, description="modeled processing latency in simulated time")] = 2.0
    sim_chunk_s: Annotated[float, Field(gt=0, le=1.0, description=(
        "chunk length in simulated time (larger: faster; stimulation lands at most this late on the patient)"))] = 1 / 16

    @model_validator(mode="after")
    def _alpha_below_nyquist(self) -> "SimulatorConfig":
        if self.alpha_uv and self.alpha_hz + 0.5 >= 0.45 * self.fs_hz:   # 0.5: half the rhythm's 1 Hz band
            raise ValueError(f"alpha_hz={self.alpha_hz:g} is too close to Nyquist at fs_hz={self.fs_hz:g}: "
                             f"keep it below {0.45 * self.fs_hz - 0.5:g} Hz")
        return self


class RingConfig(_Section):
    capacity_s: Annotated[float, Field(ge=1, le=600)] = 30.0


class ModelConfig(_Section):
    path: str = Field("", description="ONNX seizure model; empty = the shipped models/seizure/seizure_v1.onnx")
    deadline_ms: Annotated[float, Field(gt=0, le=10_000, description="window end -> decision; later results are never acted upon")] = 100.0


class StimConfig(_Section):
    channel: Annotated[int, Field(ge=0, le=255)] = 0
    waveform: Literal["biphasic", "monophasic", "sine", "dc", "ti"] = "biphasic"
    amplitude_ua: Annotated[float, Field(ge=0, le=20_000)] = 3000.0
    pulse_width_us: Annotated[float, Field(gt=0, le=10_000)] = 160.0
    interphase_gap_us: Annotated[float, Field(ge=0, le=10_000)] = 0.0
    frequency_hz: Annotated[float, Field(gt=0, le=10_000)] = 200.0
    n_pulses: Annotated[int, Field(ge=1, le=100_000)] = 100
    duration_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    ramp_s: Annotated[float, Field(ge=0, le=120)] = 0.0
    carrier_hz: Annotated[float, Field(ge=0, le=100_000, description=(
        "ti only: carrier f1 (f2 = f1 + frequency_hz, the beat); the governor wants >= 1 kHz (REFERENCE.md §7)"))] = 0.0

    @model_validator(mode="after")
    def _carrier_only_for_ti(self) -> "StimConfig":
        if self.carrier_hz and self.waveform != "ti":
            raise ValueError(f"carrier_hz={self.carrier_hz} applies to waveform 'ti' only (waveform is "
                             f"{self.waveform!r}): remove it or set waveform = \"ti\"")
        return self


class AdaptiveConfig(_Section):
    """aDBS-like: a biomarker sets the amplitude (REFERENCE §3).

    The defaults here are faster than the Summit RC+S example of REFERENCE §3: ramps 500 / 1000 µA/s,
    a decision every 1 s, 2 s blanking, where RC+S has 30 / 120 µA/s, 30 s and 15 s. At the RC+S pace
    the default 60 s session would hold only two decisions. The RC+S values are ``AdaptivePolicy``'s
    own defaults (``RCS_*`` in controller/policies/adaptive.py); set them here for a slow biomarker.
    """
    biomarker: Literal["p_seizure", "band_power"] = "p_seizure"
    band_hz: tuple[float, float] = Field((8.0, 30.0), description="band of the band_power biomarker (Percept 8-30 Hz)")
    mode: Literal["single", "dual"] = "single"
    thresholds: list[float] = Field(default_factory=lambda: [0.5], description="1 (single) or 2 (dual) values")
    min_amplitude_ua: Annotated[float, Field(ge=0, le=20_000)] = 0.0
    max_amplitude_ua: Annotated[float, Field(ge=0, le=20_000)] = 3000.0
    ramp_up_ua_per_s: Annotated[float, Field(gt=0, le=100_000)] = 500.0
    ramp_down_ua_per_s: Annotated[float, Field(gt=0, le=100_000)] = 1000.0
    decision_period_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    blanking_s: Annotated[float, Field(ge=0, le=3600)] = 2.0
    stim_period_s: Annotated[float, Field(gt=0, le=3600, description=">= 3 s under the macro profile's 20 bursts/min")] = 3.0


class OpenLoopConfig(_Section):
    """Open-loop controls (sham arms): periodic or Poisson bursts."""
    period_s: Annotated[float, Field(gt=0, le=86_400)] = 10.0
    rate_hz: Annotated[float, Field(gt=0, le=100)] = 0.1
    start_s: Annotated[float, Field(ge=0, le=7 * 24 * 3600, description="delay of the first burst, s after the policy's first step (the first chunk)")] = 0.0


class PersonalizedConfig(_Section):
    """tACS at the individual peak frequency estimated from a baseline (needs the tes profile)."""
    baseline_s: Annotated[float, Field(gt=0, le=3600)] = 20.0
    search_band_hz: tuple[float, float] = (7.0, 14.0)
    period_s: Annotated[float, Field(gt=0, le=86_400)] = 15.0
    max_segment_excess_db: Annotated[float, Field(gt=0, le=60, description=(
        "a 2 s baseline segment with this much more power than the quietest tenth is left out of the "
        "estimate (seizure, spikes, artifacts)"))] = 10.0
    min_clean_fraction: Annotated[float, Field(gt=0, le=1, description=(
        "refuse to stimulate when fewer than this fraction of the baseline's segments are clean"))] = 0.5


class PlasticityPolicyConfig(_Section):
    """Chooses frequency and pulse width by the plasticity surrogate's predicted weight change."""
    allowed_frequencies_hz: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [1.0, 10.0, 20.0, 50.0, 100.0])
    allowed_pulse_widths_us: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [100.0, 200.0, 400.0])
    target: Literal["potentiate", "depress"] = "potentiate"
    timing_ms: Annotated[float, Field(ge=-100, le=100)] = 10.0
    period_s: Annotated[float, Field(gt=0, le=86_400)] = 10.0


class AdsConfig(_Section):
    """Activity-dependent stimulation (ADS) and its random control (REFERENCE §2, Guggenmos 2013)."""
    trigger_channels: list[Annotated[int, Field(ge=0, le=255)]] = Field(
        default_factory=lambda: [0, 1], description="channels whose spikes trigger a pulse")
    delay_ms: Annotated[float, Field(ge=0, le=1000, description=(
        "spike -> pulse interval, the whole of it: the device schedules the pulse (REFERENCE §2: 7.5 ms imposed; "
        "Guggenmos's spike -> stimulus was 10 ms with their 2.5 ms of processing, docs/ads.md)"))] = 7.5
    blanking_ms: Annotated[float, Field(ge=0, le=1000, description=(
        "detector blanked after each pulse (REFERENCE §2: 28 ms)"))] = 28.0
    max_rate_hz: Annotated[float, Field(gt=0, le=1000, description="at most this many pulses per s (1 s window)")] = 10.0
    k: Annotated[float, Field(ge=2, le=20, description="spike threshold, -k sigma (REFERENCE §2: 4-5)")] = 5.0
    refractory_ms: Annotated[float, Field(ge=0, le=100, description="minimum time between detections on one channel")] = 1.0
    band_hz: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [300.0, 3000.0], description=(
        "detection band-pass [low, high] Hz, causal, before the threshold (docs/ads.md); [] for a stream "
        "the amplifier already band-passes"))
    rate_hz: Annotated[float, Field(gt=0, le=100, description=(
        "random control: mean pulse rate (match the ADS run's delivered rate)"))] = 5.0

    @model_validator(mode="after")
    def _channels(self) -> "AdsConfig":
        if self.band_hz and not (len(self.band_hz) == 2 and self.band_hz[0] < self.band_hz[1]):
            raise ValueError(f"band_hz = {self.band_hz!r}: expected [low, high] with low < high (Hz), or [] for none")
        tc = self.trigger_channels
        if not tc or len(set(tc)) != len(tc):
            raise ValueError(f"trigger_channels = {tc!r}: expected at least one channel, no repeats")
        if self.blanking_ms > 0 and self.rate_hz >= 1e3 / self.blanking_ms:
            raise ValueError(f"rate_hz = {self.rate_hz!r}: the random control keeps blanking_ms = "
                             f"{self.blanking_ms:g} ms between pulses, so rate_hz must be < {1e3 / self.blanking_ms:.4g} Hz")
        return self


POLICY_KINDS = ("responsive", "adaptive", "periodic", "poisson", "personalized", "plasticity", "ads", "random", "none")
#: policies fed by spikes detected in the stream (no seizure model)
SPIKE_POLICY_KINDS = ("ads", "random")
#: the spiking simulator needs this rate to draw spike waveforms (hil_sim/spiking.py)
SPIKING_MIN_FS_HZ = 10_000.0


class PolicyConfig(_Section):
    kind: Literal["responsive", "adaptive", "periodic", "poisson", "personalized", "plasticity", "ads", "random",
                  "none"] = "responsive"
    threshold_on: Annotated[float | None, Field(ge=0, le=1, description="empty: the model's own threshold")] = None
    threshold_off: Annotated[float | None, Field(ge=0, le=1)] = None
    min_duration_s: Annotated[float | None, Field(ge=0, le=60, description=(
        "p must stay above threshold_on this long; empty: the model's own (its contract's min_duration_s, "
        "the value its figures were measured with)"))] = None
    refractory_s: Annotated[float, Field(ge=0, le=3600)] = 5.0
    bursts_per_detection: Annotated[int, Field(ge=1, le=2, description="RNS delivers up to two bursts (REFERENCE §3)")] = 1
    burst_interval_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    blanking_s: Annotated[float, Field(ge=0, le=60, description=(
        "after each burst, samples up to this long after its end are left out and windows overlapping "
        "them are not acted on: artifacts must not trigger stimulation (REFERENCE §2)"))] = 0.5
    stim: StimConfig = Field(default_factory=StimConfig)
    adaptive: AdaptiveConfig = Field(default_factory=AdaptiveConfig)
    open_loop: OpenLoopConfig = Field(default_factory=OpenLoopConfig)
    personalized: PersonalizedConfig = Field(default_factory=PersonalizedConfig)
    plasticity: PlasticityPolicyConfig = Field(default_factory=PlasticityPolicyConfig)
    ads: AdsConfig = Field(default_factory=AdsConfig)

    @model_validator(mode="after")
    def _hysteresis(self) -> "PolicyConfig":
        if self.threshold_on is not None and self.threshold_off is not None and self.threshold_off > self.threshold_on:
            raise ValueError(f"threshold_off ({self.threshold_off}) must be <= threshold_on ({self.threshold_on})")
        return self


class SafetyConfig(_Section):
    profile: Literal["macro", "micro", "tes"] = "macro"
    overrides: dict[str, Any] = Field(default_factory=dict, description="fields of the SafetyProfile to change")


class DeviceConfig(_Section):
    kind: Literal["hil", "serial", "simulated"] = "hil"
    port: str = Field("", description="serial port path (device.kind = serial)")
    baudrate: Annotated[int, Field(ge=1200, le=12_000_000)] = 1_000_000
    timeout_ms: Annotated[float, Field(gt=0, le=10_000)] = 50.0
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    connect_timeout_s: Annotated[float, Field(ge=0, le=60, description=(
        "how long opening the device keeps saying HELLO before giving up (a device still starting, "
        "or one that resets when its port opens)"))] = 2.0
    heartbeat_s: Annotated[float, Field(gt=0, le=10, description=(
        "host heartbeat period: at most watchdog_s / 3 (drivers/PROTOCOL.md §7; a serial device's own "
        "watchdog, from its HELLO, is checked when the session starts) and below the safety profile's "
        "heartbeat_timeout_s"))] = 0.1
    watchdog_s: Annotated[float, Field(gt=0, le=60, description=(
        "emulator stops stimulation when the controller is silent this long (device.kind = hil; a serial "
        "device reports its own)"))] = 0.5
    impedance_ohm: Annotated[float | None, Field(gt=0, le=1e7, description=(
        "electrode impedance measured before the session; profiles with an impedance window "
        "(tes, macro) refuse stimulation outside it, and tes refuses when it is unknown"))] = None


class TelemetryConfig(_Section):
    enabled: bool = True
    address: str = Field("tcp://127.0.0.1:5556", description="ZeroMQ PUB endpoint; port * = any free port")
    hwm: Annotated[int, Field(ge=1, le=1_000_000, description="messages queued per subscriber before dropping")] = 1000
    signal_hz: Annotated[float, Field(gt=0, le=1000, description="rate of the decimated signal topic")] = 64.0


class ControlConfig(_Section):
    enabled: bool = True
    address: str = Field("tcp://127.0.0.1:5557", description="ZeroMQ REP endpoint; non-loopback needs CURVE keys")
    require_auth: bool = Field(False, description="CURVE even on loopback")
    server_secret_key: str = Field("", description="server secret key file (stimloop keys)")
    authorized_clients_dir: str = Field("", description="folder of authorized clients' public keys")


class Config(_Section):
    session: SessionConfig = Field(default_factory=SessionConfig)
    source: SourceConfig = Field(default_factory=SourceConfig)
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)
    ring: RingConfig = Field(default_factory=RingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    device: DeviceConfig = Field(default_factory=DeviceConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    faults: list[FaultSpec] = Field(default_factory=list, description="HIL fault injection ([[faults]], docs/faults.md)")

    @model_validator(mode="after")
    def _spike_sessions(self) -> "Config":
        """Cross-section rules of spiking simulators and spike-driven policies (ADS, random control)."""
        sim, pol = self.simulator, self.policy
        problems = []
        if sim.model == "spiking":
            if sim.fs_hz < SPIKING_MIN_FS_HZ:
                problems.append(f"simulator.fs_hz = {sim.fs_hz:g}: the spiking simulator needs >= "
                                f"{SPIKING_MIN_FS_HZ:g} Hz to draw spike waveforms (30000 is usual)")
            tc = pol.ads.trigger_channels
            if max(tc) >= sim.n_channels or sim.n_channels < len(tc) + 1:
                problems.append(f"policy.ads.trigger_channels = {tc!r}: the spiking simulator has "
                                f"{sim.n_channels} channels (0..{sim.n_channels - 1}) and needs one more "
                                "than the trigger channels for its target unit")
        if pol.kind in SPIKE_POLICY_KINDS:
            a = pol.ads
            if self.source.kind == "hil" and sim.model != "spiking":
                problems.append(f'policy.kind = "{pol.kind}" needs spikes: set simulator.model = "spiking" '
                                f"(and simulator.fs_hz >= {SPIKING_MIN_FS_HZ:g}, e.g. 30000); the "
                                f'"{sim.model}" simulator has none')
            if self.safety.profile != "micro":
                problems.append(f'safety.profile = "{self.safety.profile}": policy.kind = "{pol.kind}" is '
                                'microstimulation, set safety.profile = "micro" (REFERENCE §2, §4)')
            if pol.stim.waveform != "biphasic":
                problems.append(f'policy.stim.waveform = "{pol.stim.waveform}": policy.kind = "{pol.kind}" '
                                'needs a charge-balanced biphasic pulse (REFERENCE §4)')
            if self.source.kind == "hil" and sim.chunk_s * 1e3 >= a.delay_ms:
                problems.append(f"simulator.chunk_s = {sim.chunk_s:g}: a spike must reach the loop before its "
                                f"pulse is due, so chunks must be shorter than policy.ads.delay_ms = "
                                f"{a.delay_ms:g} ms (0.001 is usual)")
        if problems:
            raise ValueError("\n    ".join(problems))
        return self

    @model_validator(mode="after")
    def _heartbeat_keeps_watchdogs_quiet(self) -> "Config":
        """The host heartbeat must come well within the device's watchdog and the governor's heartbeat
        timeout: slower, the device stops stimulating between two heartbeats (a device_watchdog fault that
        latches the session for good) or the governor refuses every request."""
        d = self.device
        problems = []
        # Only for the emulator (kind "hil"), which watchdog_s configures: a real serial device reports
        # its own watchdog at HELLO, which make_actuator checks before the session starts, and the
        # in-process simulated device has none.
        if d.kind == "hil" and d.heartbeat_s > d.watchdog_s / 3 * (1 + 1e-9):
            problems.append(
                f"device.heartbeat_s = {d.heartbeat_s:g} s is more than device.watchdog_s / 3 = "
                f"{d.watchdog_s / 3:.4g} s: drivers/PROTOCOL.md §7 asks for a heartbeat at least every "
                "watchdog_s / 3, or the device stops all stimulation between two of them and the session "
                "latches a device_watchdog fault; lower device.heartbeat_s or raise device.watchdog_s")
        timeout_s = _profile_heartbeat_timeout_s(self.safety)
        if timeout_s is not None and not d.heartbeat_s < timeout_s:
            problems.append(
                f"device.heartbeat_s = {d.heartbeat_s:g} s is not below the safety profile's heartbeat_timeout_s "
                f"= {timeout_s:g} s (safety.profile = \"{self.safety.profile}\"): the governor refuses every "
                "request once no heartbeat came for that long; lower device.heartbeat_s")
        if problems:
            raise ValueError("\n    ".join(problems))
        return self

    def model_path(self) -> Path:
        if self.model.path:
            return Path(self.model.path).expanduser()
        return Path(__file__).resolve().parent.parent / "models" / "seizure" / "seizure_v1.onnx"

    def to_toml(self) -> str:
        return dump_toml(self.model_dump(mode="json"))


def _profile_heartbeat_timeout_s(safety: SafetyConfig) -> float | None:
    """The configured profile's ``heartbeat_timeout_s``; ``None`` when it has none or cannot be built
    (an unsafe profile is refused, with its rule, by the start-up safety check)."""
    from controller.safety import build_profile
    try:
        return build_profile(safety.profile, safety.overrides).heartbeat_timeout_s
    except Exception:
        return None


def _model_of(annotation: Any) -> Any:
    """The pydantic model inside a field annotation (``X``, ``X | None``), or ``None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _field_info(loc: tuple, root: Any) -> tuple[Any, Any]:
    """``(model that holds the last field of loc, its FieldInfo)``; ``(None, None)`` when loc leaves the models."""
    model: Any = root
    info = None
    for i, part in enumerate(loc):
        if isinstance(part, int):  # an item of a list of models (faults.2.level_uv): same model
            if i == len(loc) - 1:
                return None, None
            continue
        fields = getattr(model, "model_fields", None)
        if not fields:
            return None, None
        if part not in fields:
            return (model, None) if i == len(loc) - 1 else (None, None)
        info = fields[part]
        if i < len(loc) - 1:
            model = _model_of(info.annotation)
    return model, info


def _field_range(loc: tuple, root: Any = None) -> str:
    """The documented range of the field at ``loc`` (e.g. "> 0, <= 120"), from its annotations."""
    _, info = _field_info(loc, root or Config)
    if info is None:
        return ""
    ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = [f"{op} {getattr(m, k)}" for m in info.metadata for k, op in ops.items() if getattr(m, k, None) is not None]
    return ", ".join(parts)


def _describe(err: dict, prefix: tuple = (), root: Any = None, unknown_hint: str = "") -> str:
    """One problem as ``dotted.name = value: why (allowed range: ...)``.

    ``prefix`` and ``root``: errors of a model validated on its own from part of the file
    (the safety profile built from ``safety.overrides``), named by their full path in the file.
    """
    loc = tuple(p for p in err["loc"] if not str(p).startswith("function-after"))
    name = ".".join(str(p) for p in prefix + loc) or "<root>"
    # pydantic's prefix for a validator's ValueError says nothing the message does not.
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        model, _ = _field_info(loc, root or Config)
        close = get_close_matches(str(loc[-1]), list(getattr(model, "model_fields", ())), n=1) if loc else []
        where = unknown_hint or ("docs/faults.md lists the fields of each kind" if loc[:1] == ("faults",)
                                 else "`stimloop config show` lists the fields")
        if close:
            return f"{name}: unknown field, did you mean {close[0]}? ({where})"
        return f"{name}: unknown field (check the spelling; {where})"
    if not prefix + loc:  # a rule across sections: the message names the fields; the input is the whole file
        return msg
    if not loc:  # a rule across the fields of the part given: its input is all of them
        return f"{name}: {msg}"
    if err["type"] == "missing":   # its "input" is the table it is missing from, not a value of its own
        text = f"{name}: missing, it is required"
    else:
        text = f"{name} = {err.get('input')!r}: {msg}"
    allowed = _field_range(loc, root)
    if allowed:
        text += f" (allowed range: {allowed})"
    return text


def describe_errors(exc: ValidationError, origin: str, prefix: tuple = (), root: Any = None,
                    unknown_hint: str = "") -> str:
    """The message of a ``ConfigError``: ``origin: N problem(s)`` then one line per problem."""
    described = [_describe(e, prefix, root, unknown_hint) for e in exc.errors()]
    problems = "\n".join(f"  - {d}" for d in described)
    # A check across sections raises its problems as one error, one line each ("\n    ".join): count those.
    return f"{origin}: {sum(len(d.splitlines()) for d in described)} problem(s)\n{problems}"


def parse_config(data: dict, origin: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, origin)) from None


def load_config(path: str | Path | list[str | Path] | tuple | None = None, overrides: dict | None = None) -> Config:
    """Load defaults, then ``path`` on top, then ``overrides`` (nested dicts).

    ``path`` may be a list of files, layered in order (a lab's device file, then an experiment's):
    tables merge key by key, and a value or an array (``[[faults]]``) in a later file replaces the
    earlier one.
    """
    data, origin = _read_layers(path, overrides)
    return parse_config(data, origin)


def load_config_leniently(path: str | Path | list[str | Path] | tuple | None = None
                          ) -> tuple[Config | None, ConfigError | None]:
    """``(config, field errors)``: as ``load_config``, but a field that fails its check is reported
    and then taken at its default, so that the checks that need a whole config (the safety profile,
    the policy) can still run on the rest: ``config validate`` reports both at once. ``config`` is
    None only when even that fails (a file that is missing or not TOML raises, as in ``load_config``)."""
    data, origin = _read_layers(path, None)
    try:
        return parse_config(data, origin), None
    except ConfigError as first:
        trimmed = copy.deepcopy(data)
        dropped = False
        for _ in range(8):           # a default may fail a model-level check in turn: drop that too
            try:
                return Config.model_validate(trimmed), first
            except ValidationError as exc:
                if any([_drop_at(trimmed, tuple(e["loc"])) for e in exc.errors()]):
                    dropped = True
                    continue
                if not dropped:      # only checks across sections failed: ``first`` says it all
                    return None, first
                # Checks across sections (the heartbeat against the watchdog, the spiking simulator
                # against the ADS policy) that the field errors kept from running: the rest's problems.
                return None, ConfigError(f"{first}\nand, with those fields at their defaults, "
                                         f"{describe_errors(exc, origin)}")
        return None, first


def _drop_at(data: dict, loc: tuple) -> bool:
    """Remove the value at ``loc`` (or the key holding the list ``loc`` points into); True if removed."""
    keys = []
    for k in loc:
        if not isinstance(k, str):
            break
        keys.append(k)
    node = data
    for k in keys[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False
    if keys and isinstance(node, dict) and keys[-1] in node:
        del node[keys[-1]]
        return True
    return False


def _read_layers(path, overrides: dict | None) -> tuple[dict, str]:
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    data: dict = {}
    for p in map(Path, paths):
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        if not p.is_file():
            raise ConfigError(f"config file {p} is not a file (a folder, a device or a pipe)")
        try:
            text = p.read_text(encoding="utf-8-sig")   # a BOM, as some Windows editors write, is no statement
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not a TOML text file (not UTF-8: {exc.reason} at byte {exc.start})") from None
        try:
            data = _merge(data, tomllib.loads(text))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    origin = " + ".join(map(str, paths)) or "defaults"
    if overrides:
        data = _merge(data, overrides)
        origin += " + overrides"   # e.g. the command line's --duration: the error's field says which
    return data, origin


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dump_toml(data: dict) -> str:
    """TOML text of a config dict; ``None`` (\"use the default\") is left out."""
    return tomli_w.dumps(_drop_none(data))


def _drop_none(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_none(x) for x in v]
    return v
