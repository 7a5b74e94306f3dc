"""The transport's ceiling: bare grpc.aio servers that do no work, for the benchmarks to run the
same clients against beside the real service (no interceptor, no store, no hashing, no file).

    python -m bench.bare_server resource PORT   # ValidateLease answers a constant
    python -m bench.bare_server upload PORT     # CreateJob counts the streamed bytes

Started and stopped by `bench.common.bare_server`.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc

from mocap.v1 import common_pb2, gateway_pb2_grpc, resource_pb2, resource_pb2_grpc


class BareResource(resource_pb2_grpc.ResourceServiceServicer):
    async def ValidateLease(self, request: Any, context: Any) -> resource_pb2.ValidateLeaseResponse:
        return resource_pb2.ValidateLeaseResponse(valid=True)


class BareUpload(gateway_pb2_grpc.GatewayServiceServicer):
    async def CreateJob(self, request_iterator: Any, context: Any) -> common_pb2.Job:
        received = 0
        async for message in request_iterator:
            received += len(message.chunk.data)
        return common_pb2.Job(size_bytes=received)


SERVERS = {
    "resource": (BareResource, resource_pb2_grpc.add_ResourceServiceServicer_to_server),
    "upload": (BareUpload, gateway_pb2_grpc.add_GatewayServiceServicer_to_server),
}


async def serve(name: str, port: int) -> None:
    servicer, add = SERVERS[name]
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    add(servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
