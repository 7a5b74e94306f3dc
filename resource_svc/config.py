"""resource_svc configuration: defaults, then MOCAP_RESOURCE_* variables, then flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mocap_common.config import ServiceConfig, setting
from resource_svc.broker import BrokerConfig, SlotPlan
from resource_svc.leases import SlotKind


@dataclass(frozen=True)
class ResourceConfig(ServiceConfig):
    """The GPU lease broker."""

    service_name = "resource"

    port: int = setting(50055, "gRPC port.")
    grace_seconds: float = setting(
        2.0, "On SIGTERM, how long in-flight calls may finish (waiting Acquires and watches end at once).")
    db_path: Path = setting(Path("data/resource/leases.sqlite3"), "SQLite file holding the lease table (WAL).")
    sqlite_synchronous: str = setting(
        "full", "SQLite synchronous mode: full (every acknowledged change survives power loss; group commit "
                "keeps it fast) or normal (survives a broker crash; a power loss may lose the last commits, "
                "and with them fencing tokens could be handed out twice).")
    inventory: str = setting(
        "auto", "Devices: auto (NVIDIA GPUs through NVML if any, else CPU devices), nvml (GPUs or fail), cpu.")
    cpu_devices: int = setting(1, "CPU devices served without GPUs: cpu:0 .. cpu:N-1.")
    gpu_training_slots: int = setting(1, "Training slots per GPU.")
    gpu_inference_slots: int = setting(3, "Inference slots per GPU.")
    cpu_training_slots: int = setting(1, "Training slots per CPU device.")
    cpu_inference_slots: int = setting(2, "Inference slots per CPU device.")
    slot_overrides: tuple[str, ...] = setting(
        (), "Per-device slot counts, DEVICE/KIND=N, comma-separated; DEVICE is an id (gpu:1, cpu:0) or "
            "an NVML UUID, KIND training or inference. E.g. gpu:0/inference=6,gpu:0/training=0.")
    nvml_refresh_s: float = setting(5.0, "Seconds between NVML refreshes of memory, utilisation and processes.")
    leak_check_delay_s: float = setting(
        2.0, "After a release or reclaim on a GPU, seconds before asking NVML which processes still hold memory.")
    events_kept: int = setting(100_000, "Lease events kept for WatchLeases resume (older ones are pruned).")
    log_lease_rpcs: bool = setting(
        False, "Log every successful Acquire/Release/Renew/KeepAlive/ValidateLease call (off: they run at "
               "thousands per second; failures are always logged, and grants, reclaims and leaks are events).")
    ended_leases_kept: int = setting(
        10_000, "Ended leases kept for GetLease, ListLeases and request_id retries (older ones are pruned).")

    def broker_config(self) -> BrokerConfig:
        return BrokerConfig(slots=self.slot_plan(), ended_kept=self.ended_leases_kept,
                            refresh_interval_s=self.nvml_refresh_s, leak_check_delay_s=self.leak_check_delay_s)

    def slot_plan(self) -> SlotPlan:
        overrides: dict[str, dict[SlotKind, int]] = {}
        for entry in self.slot_overrides:
            device, kind, count = _parse_override(entry)
            overrides.setdefault(device, {})[kind] = count
        return SlotPlan(
            gpu={SlotKind.TRAINING: self.gpu_training_slots, SlotKind.INFERENCE: self.gpu_inference_slots},
            cpu={SlotKind.TRAINING: self.cpu_training_slots, SlotKind.INFERENCE: self.cpu_inference_slots},
            overrides=overrides,
        )


def _parse_override(entry: str) -> tuple[str, SlotKind, int]:
    try:
        target, count = entry.rsplit("=", 1)
        device, kind = target.rsplit("/", 1)
        parsed = (device.strip(), SlotKind(kind.strip().lower()), int(count))
    except ValueError:
        raise SystemExit(f"invalid --slot-overrides entry {entry!r}: expected DEVICE/KIND=N, "
                         "e.g. gpu:0/inference=6") from None
    if parsed[2] < 0 or not parsed[0]:
        raise SystemExit(f"invalid --slot-overrides entry {entry!r}: need a device and N >= 0")
    return parsed
