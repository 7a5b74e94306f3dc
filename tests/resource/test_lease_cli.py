"""The `lease` command against a real broker: `lease run` wraps a command in a lease (env, exit
status, signals, kill -9, lease loss), and `devices`/`list`/`watch` speak JSON for machines."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from mocap.v1 import resource_pb2
from tests.support import free_port

from .conftest import acquire_request, eventually, stub

LEASE = [sys.executable, "-m", "resource_svc.cli"]  # what the `lease` console script runs


def lease_cmd(address: str, *args: str) -> list[str]:
    return [*LEASE, "--addr", address, *args]


def start(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            text=True, **kwargs)


async def _lease_of(address: str, state: int = resource_pb2.LEASE_STATE_UNSPECIFIED) -> list[resource_pb2.Lease]:
    async with grpc.aio.insecure_channel(address) as channel:
        return list((await stub(channel).ListLeases(resource_pb2.ListLeasesRequest(state=state), timeout=5)).leases)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie still answers kill(0): it holds nothing any more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _group_gone(pgid: int) -> bool:
    """No live (non-zombie) process is left in the group; zombies wait for init to reap them."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return False
    return True


async def _wait_file(path: Path, timeout_s: float = 20) -> str:
    await eventually(lambda: path.exists() and path.read_text().strip(), timeout_s, what=str(path))
    return path.read_text().strip()


async def test_run_passes_the_lease_to_the_command_and_returns_its_status(broker, tmp_path):
    out = tmp_path / "env.txt"
    script = f'printf "%s|%s|%s" "${{CUDA_VISIBLE_DEVICES-unset}}" "$MOCAP_LEASE_NAME" "$MOCAP_LEASE_DEVICE" > {out}; exit 7'
    proc = await asyncio.to_thread(subprocess.run, lease_cmd(broker.address, "run", "--kind", "inference", "--",
                                                             "sh", "-c", script), capture_output=True, text=True)
    assert proc.returncode == 7, proc.stderr
    visible, name, device = out.read_text().split("|")
    assert visible == "" and device == "cpu:0"  # a CPU device: no GPU visible
    [lease] = await _lease_of(broker.address)
    assert lease.name == name and lease.state == resource_pb2.LEASE_STATE_RELEASED
    assert lease.holder.service == "lease-run" and "exit 7" in lease.holder.job


async def test_lease_run_killed_with_sigkill_is_reclaimed_after_its_ttl_and_takes_its_command_along(broker,
                                                                                                   tmp_path):
    pid_file = tmp_path / "pid"
    runner = start(lease_cmd(broker.address, "run", "--kind", "training", "--ttl", "2", "--",
                             "sh", "-c", f"echo $$ > {pid_file}; exec sleep 600"))
    command_pid = int(await _wait_file(pid_file))
    [held] = await _lease_of(broker.address, resource_pb2.LEASE_STATE_ACTIVE)
    os.kill(runner.pid, signal.SIGKILL)
    killed = time.monotonic()
    runner.wait(10)
    await eventually(lambda: _gone(command_pid), 5, "the command to die with `lease run`")
    reclaimed = await eventually(lambda: _reclaimed(broker.address, held.name), 2 + 1 + 2, "the reclaim")
    assert time.monotonic() - killed <= 2 + 1 + 1  # within TTL + 1 s (+ polling slack)
    assert reclaimed.holder.pid == runner.pid


async def _reclaimed(address: str, name: str) -> resource_pb2.Lease | None:
    async with grpc.aio.insecure_channel(address) as channel:
        lease = await stub(channel).GetLease(resource_pb2.GetLeaseRequest(name=name), timeout=5)
    return lease if lease.state == resource_pb2.LEASE_STATE_RECLAIMED else None


async def test_lease_run_whose_lease_is_revoked_kills_its_command_group(broker, tmp_path):
    pid_file = tmp_path / "pid"
    runner = start(lease_cmd(broker.address, "run", "--kind", "training", "--ttl", "1.5", "--kill-grace", "1",
                             "--", "sh", "-c", f"sleep 600 & echo $$ > {pid_file}; wait"))
    group = int(await _wait_file(pid_file))  # the command leads its own process group
    assert not _group_gone(group)
    [held] = await _lease_of(broker.address, resource_pb2.LEASE_STATE_ACTIVE)
    async with grpc.aio.insecure_channel(broker.address) as channel:  # an operator revokes it
        await stub(channel).Release(resource_pb2.ReleaseRequest(name=held.name, fencing_token=held.fencing_token),
                                    timeout=5)
    code = await asyncio.to_thread(runner.wait, 15)
    stderr = runner.stderr.read()
    assert code == 75, stderr
    assert "was lost" in stderr and held.name in stderr and f"process group {group}" in stderr
    await eventually(lambda: _group_gone(group), 2, "the command's group to be gone")


async def test_sigterm_is_forwarded_to_the_command_and_its_status_returned(broker, tmp_path):
    ready = tmp_path / "ready"
    runner = start(lease_cmd(broker.address, "run", "--kind", "training", "--",
                             "sh", "-c", f'trap "exit 42" TERM; echo yes > {ready}; while :; do sleep 0.05; done'))
    await _wait_file(ready)
    runner.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(runner.wait, 15) == 42
    [lease] = await _lease_of(broker.address)
    assert lease.state == resource_pb2.LEASE_STATE_RELEASED


async def test_devices_list_and_watch_print_json(broker):
    async with grpc.aio.insecure_channel(broker.address) as channel:
        held = await stub(channel).Acquire(acquire_request(job="jobs/j1"), timeout=5)
    devices = json.loads(subprocess.run(lease_cmd(broker.address, "devices", "--json"), capture_output=True,
                                        text=True, check=True).stdout)
    assert devices[0]["id"] == "cpu:0" and {s["kind"]: s.get("used", 0) for s in devices[0]["slots"]} == {
        "SLOT_KIND_TRAINING": 1, "SLOT_KIND_INFERENCE": 0}
    listed = json.loads(subprocess.run(lease_cmd(broker.address, "list", "--json", "--state", "active"),
                                       capture_output=True, text=True, check=True).stdout)
    assert [(entry["name"], entry["holder"]["job"]) for entry in listed] == [(held.name, "jobs/j1")]
    table = subprocess.run(lease_cmd(broker.address, "list"), capture_output=True, text=True, check=True).stdout
    assert held.name in table and "jobs/j1" in table
    watcher = start(lease_cmd(broker.address, "watch", "--json", "--after-seq", "0"))
    try:
        first = await asyncio.wait_for(asyncio.to_thread(watcher.stdout.readline), 10)
    finally:
        watcher.kill()
        watcher.wait()
    event = json.loads(first)
    assert (event["seq"], event["type"], event["lease"]["name"]) == ("1", "LEASE_EVENT_TYPE_GRANTED", held.name)
    # By default `lease watch` follows from now on, like tail -f: no history replayed.
    follower = start(lease_cmd(broker.address, "watch", "--json"))
    line = asyncio.ensure_future(asyncio.to_thread(follower.stdout.readline))
    try:
        async with grpc.aio.insecure_channel(broker.address) as channel:
            while not line.done():  # until the follower is subscribed and hears one
                lease = await stub(channel).Acquire(acquire_request(resource_pb2.SLOT_KIND_INFERENCE), timeout=5)
                await stub(channel).Release(resource_pb2.ReleaseRequest(
                    name=lease.name, fencing_token=lease.fencing_token), timeout=5)
                await asyncio.wait([line], timeout=0.2)
    finally:
        follower.kill()
        follower.wait()
    assert int(json.loads(line.result())["seq"]) > 1


async def test_exit_codes_say_what_went_wrong(broker):
    unreachable = subprocess.run(lease_cmd(f"127.0.0.1:{free_port()}", "run", "--kind", "training", "--", "true"),
                                 capture_output=True, text=True)
    assert unreachable.returncode == 69 and "unavailable" in unreachable.stderr
    async with grpc.aio.insecure_channel(broker.address) as channel:
        await stub(channel).Acquire(acquire_request(), timeout=5)
    no_slot = await asyncio.to_thread(subprocess.run, lease_cmd(broker.address, "run", "--kind", "training",
                                                                "--wait", "0.3", "--", "true"),
                                      capture_output=True, text=True)
    assert no_slot.returncode == 73 and "no slot" in no_slot.stderr
    no_device = subprocess.run(lease_cmd(broker.address, "run", "--kind", "inference", "--device", "9", "--", "true"),
                               capture_output=True, text=True)
    assert no_device.returncode == 64 and "NO_SUCH_DEVICE" in no_device.stderr
    missing = subprocess.run(lease_cmd(broker.address, "run", "--kind", "inference", "--", "/no/such/command"),
                             capture_output=True, text=True)
    assert missing.returncode == 127 and "not found" in missing.stderr
