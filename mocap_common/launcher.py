"""`make run`: the whole mesh on one machine, as five child processes.

Starts the services of `mocap_common.services.SERVICES` (resource_svc, tracker_svc, smoother_svc,
exporter_svc and the gateway, in that order, each waiting for the previous ones to report health
SERVING), then waits. Ctrl-C or SIGTERM
stops them all gracefully (SIGTERM, then SIGKILL of each process group after a grace period);
if any service dies, the others are stopped too and the launcher exits non-zero. No child
outlives the launcher, even one killed with kill -9: `mocap_common.procs.child_process` ties
every service's process group to the launcher's life.

Before anything starts, every port of the mesh must be free: a port something already listens
on (typically a service of an earlier mesh that was not stopped) would otherwise answer the
health checks in place of the service started now — gRPC servers bind with SO_REUSEPORT, so the
new one may even start beside it — and the mesh would report SERVING while running someone
else's code. The launcher then exits with status 2 naming the port and the service.

`--demo [VIDEO] --out DIR` additionally submits VIDEO (default: the demo clip shipped in
`mocap_common/demo/`) through the CLI (`mocap submit --wait`), downloads the results into DIR, and
stops the mesh when the job ends. Every path is made absolute against the launcher's working
directory before any child starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mocap_common.config import absolute_path
from mocap_common.procs import child_process, finish_uncancellable, terminate_group
from mocap_common.services import SERVICES, ServiceSpec

DEMO_CLIP = Path(__file__).resolve().parent / "demo" / "runner_1080p.mp4"


@dataclass
class Running:
    spec: ServiceSpec
    proc: asyncio.subprocess.Process
    address: str
    log_path: Path
    exited: asyncio.Task[int] = field(init=False)


async def wait_serving(address: str, proc: asyncio.subprocess.Process, timeout_s: float) -> None:
    """Waits for health SERVING; fails early if the process exits first."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"exited with status {proc.returncode}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"not SERVING after {timeout_s:.0f}s")


class Mesh:
    """The five services as children of this process."""

    def __init__(self, host: str, base_port: int | None, log_dir: Path, ready_timeout_s: float) -> None:
        self.host = host
        self.base_port = base_port
        self.log_dir = log_dir
        self.ready_timeout_s = ready_timeout_s
        self.running: list[Running] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        for i, spec in enumerate(SERVICES):
            self.env.setdefault(spec.env_addr, f"{host}:{self.port_of(spec, i)}")

    def port_of(self, spec: ServiceSpec, i: int) -> int:
        return spec.port if self.base_port is None else self.base_port + i

    def check_ports_free(self) -> None:
        """Exits (status 2) naming the first service whose port is already taken."""
        for spec in SERVICES:
            port = int(self.env[spec.env_addr].rsplit(":", 1)[1])
            problem = port_taken(self.host, port)
            if problem:
                print(_port_taken_message(spec, self.host, port, problem), file=sys.stderr, flush=True)
                raise SystemExit(2)

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for spec in SERVICES:
            address = self.env[spec.env_addr]
            port = address.rsplit(":", 1)[1]
            log_path = self.log_dir / f"{spec.name}.log"
            log = open(log_path, "ab")
            argv = [sys.executable, "-m", spec.module, "--host", self.host, "--port", port]
            proc = await stack.enter_async_context(child_process(argv, env=self.env, stdout=log, stderr=log))
            log.close()
            running = Running(spec, proc, address, log_path)
            running.exited = asyncio.create_task(proc.wait())
            self.running.append(running)
            print(f"  starting {spec.name:<9} {address:<17} log {log_path}", flush=True)
            try:
                await wait_serving(address, proc, self.ready_timeout_s)
            except RuntimeError as exc:
                raise SystemExit(f"{spec.name} failed to start ({exc}); see {log_path}:\n{_tail(log_path)}") from None
            print(f"  {spec.name:<9} SERVING", flush=True)

    async def first_exit(self) -> Running:
        done, _ = await asyncio.wait([r.exited for r in self.running], return_when=asyncio.FIRST_COMPLETED)
        finished = done.pop()
        return next(r for r in self.running if r.exited is finished)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM every service (gateway first), wait for each, then make sure every group is gone."""
        for running in reversed(self.running):
            await terminate_group(running.proc, grace_s)


def port_taken(host: str, port: int) -> str | None:
    """Why `port` on `host` cannot be ours (e.g. "Address already in use"), None when it is free.

    A plain bind, without SO_REUSEPORT: it fails while any socket listens on the port, whatever
    options that one was bound with (SO_REUSEPORT only shares a port among sockets that all set
    it). SO_REUSEADDR keeps connections of an earlier run in TIME_WAIT from counting as taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return f"cannot resolve {host}: {error.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            return error.strerror or str(error)
    return None


def _port_taken_message(spec: ServiceSpec, host: str, port: int, problem: str) -> str:
    return (f"mocap mesh: port {port} on {host}, for the {spec.name} service ({spec.env_addr}), is not free "
            f"({problem}): another program — perhaps a service of an earlier mesh that is still running — "
            f"listens there and would answer in place of the {spec.name}. Stop it, or choose other ports "
            "with --base-port. Nothing was started.")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def run_demo(mesh: Mesh, video: Path, out: Path) -> int:
    gateway = mesh.env["MOCAP_GATEWAY_ADDR"]
    argv = [sys.executable, "-m", "gateway.cli", "--addr", gateway, "submit", str(video), "--wait", "--out", str(out)]
    async with child_process(argv, env=mesh.env, stdin=None) as proc:
        return await proc.wait()


async def main_async(args: argparse.Namespace) -> int:
    mesh = Mesh(args.host, args.base_port, Path(args.log_dir), args.ready_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    status = 0
    mesh.check_ports_free()  # before any child starts: no half-started mesh to stop
    async with contextlib.AsyncExitStack() as stack:
        try:
            print(f"mocap mesh: starting {len(SERVICES)} services", flush=True)
            await mesh.start(stack)
            waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(mesh.first_exit())]
            if args.demo:
                waiters.append(asyncio.create_task(run_demo(mesh, args.demo, args.out)))
            else:
                print("all services SERVING; Ctrl-C stops them", flush=True)
            done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            finished = done.pop()
            result = finished.result()
            if isinstance(result, Running):
                print(f"{result.spec.name} exited unexpectedly (status {result.proc.returncode}); "
                      f"stopping the mesh. Log tail:\n{_tail(result.log_path)}", file=sys.stderr)
                status = 1
            elif finished is not waiters[0]:  # the demo's exit status (waiters[0] is the stop signal)
                status = int(result)
        finally:
            print("stopping services", flush=True)
            await finish_uncancellable(mesh.stop(args.grace))
    print("all services stopped", flush=True)
    return status


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mocap-mesh-run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("MOCAP_HOST", "127.0.0.1"))
    parser.add_argument("--base-port", type=int, default=None,
                        help=f"use consecutive ports from here ({', '.join(s.name for s in SERVICES)}) "
                             f"instead of the defaults {', '.join(str(s.port) for s in SERVICES)}")
    parser.add_argument("--log-dir", type=absolute_path, default=absolute_path("data/logs"))
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    parser.add_argument("--grace", type=float, default=15.0)
    parser.add_argument("--demo", metavar="VIDEO", nargs="?", type=absolute_path, const=DEMO_CLIP,
                        help=f"submit VIDEO (default {DEMO_CLIP.name}, shipped with the package) and wait "
                             "for its results")
    parser.add_argument("--out", type=absolute_path, default=absolute_path("out"),
                        help="where --demo writes the results")
    args = parser.parse_args(argv)
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
