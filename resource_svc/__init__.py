"""resource_svc — the GPU lease broker.

Reads top-down: `__main__` (entry), `config` (ResourceConfig), `server` (thin gRPC adapter) and
`convert` (protobuf ⇄ broker types), then the domain: `broker` (LeaseBroker: slots, leases,
waiting, expiry), `leases` (its types and named errors), `waiters` (the priority/FIFO queue),
`store` (SQLite lease table + group-commit writer), `events` (WatchLeases fan-out), `inventory`
(NVML or CPU devices), `leaks` (who holds GPU memory without a lease). `cli` is the `lease`
command; the Python client library is `mocap_common.lease_client`.
"""
