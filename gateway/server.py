"""GatewayService over gRPC: who is calling, decode, call the domain, encode. Nothing else.

Errors are `ServiceError`s raised by the domain; the shared interceptor turns them into
google.rpc.Status with ErrorInfo / BadRequest / RetryInfo. CreateJob's request stream is drained
before the call ends (`mocap_common.streams`), so that status is what the client sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2

from gateway.jobs import UploadRecord, job_name, timestamp, to_proto, upload_name
from gateway.service import JobService
from gateway.tenancy import Tenancy
from mocap.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from mocap_common.logs import bind_context
from mocap_common.streams import draining

# gRPC reports a client's cancel to the handler first as an ordinary end of the request stream,
# and cancels the handler a moment later. A stream that ends short waits this long, so a broken
# stream (kept for resume) is not mistaken for a short one (refused and deleted).
BROKEN_STREAM_GRACE_S = 0.25


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, service: JobService, tenancy: Tenancy) -> None:
        self._service = service
        self._tenancy = tenancy

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        tenant = self._tenancy.tenant(context.invocation_metadata())
        bind_context(tenant=tenant)
        return tenant

    async def CreateJob(self, request_iterator: AsyncIterator[gateway_pb2.CreateJobRequest],
                        context: grpc.aio.ServicerContext) -> common_pb2.Job:
        # Drained however the upload ends before the client has sent everything (a refused header
        # or chunk, a bad token, an early answer for a known request_id or content), after the
        # upload's files and row are settled: the client gets this answer, not INTERNAL.
        async with draining(request_iterator) as requests:
            tenant = self._tenant(context)
            job = await self._service.create_job(tenant, requests, lambda: asyncio.sleep(BROKEN_STREAM_GRACE_S))
        return to_proto(job)

    async def GetUpload(self, request: gateway_pb2.GetUploadRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.Upload:
        return _upload_proto(await self._service.get_upload(self._tenant(context), request.request_id, request.name))

    async def GetJob(self, request: gateway_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> common_pb2.Job:
        return to_proto(await self._service.get_job(self._tenant(context), request.name))

    async def ListJobs(self, request: gateway_pb2.ListJobsRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.ListJobsResponse:
        jobs, token = await self._service.list_jobs(self._tenant(context), request.page_size, request.page_token, request.state)
        return gateway_pb2.ListJobsResponse(jobs=[to_proto(j) for j in jobs], next_page_token=token)

    async def CancelJob(self, request: gateway_pb2.CancelJobRequest, context: grpc.aio.ServicerContext) -> common_pb2.Job:
        return to_proto(await self._service.cancel_job(self._tenant(context), request.name))

    async def DeleteJob(self, request: gateway_pb2.DeleteJobRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._service.delete_job(self._tenant(context), request.name)
        return empty_pb2.Empty()

    async def WatchJob(self, request: gateway_pb2.WatchJobRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.JobEvent]:
        async for event in self._service.watch_job(self._tenant(context), request.name, request.after_seq):
            yield event

    async def DownloadArtifact(self, request: gateway_pb2.DownloadArtifactRequest,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.DownloadArtifactResponse]:
        async for piece in self._service.read_artifact(self._tenant(context), request.name, request.offset):
            yield gateway_pb2.DownloadArtifactResponse(artifact=piece.artifact, offset=piece.offset, data=piece.data)


def _upload_proto(upload: UploadRecord) -> gateway_pb2.Upload:
    name = upload_name(upload.upload_id)
    if upload.complete:
        return gateway_pb2.Upload(name=name, request_id=upload.request_id, state=gateway_pb2.UPLOAD_STATE_COMPLETE,
                                  committed_bytes=upload.size_bytes, size_bytes=upload.size_bytes,
                                  job=job_name(upload.job_id))
    return gateway_pb2.Upload(name=name, request_id=upload.request_id, state=gateway_pb2.UPLOAD_STATE_ACTIVE,
                              committed_bytes=upload.committed_bytes, size_bytes=upload.size_bytes,
                              expire_time=timestamp(upload.expire_us))
