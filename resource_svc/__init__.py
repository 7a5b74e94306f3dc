"""resource_svc — the GPU lease broker.

Reads top-down: `__main__` (entry), `config` (ResourceConfig), `server` (thin gRPC adapter) and
`convert` (protobuf ⇄ broker types), then the domain: `broker` (LeaseBroker: the one event loop
that grants, ends, reclaims and restores), split by concern as etcd splits its lessor — `slots`
(capacity, free slots, holders, fencing tokens), `book` (active and ended leases), `waitlist`
(fair waiting per kind, over `waiters`' priority/FIFO queue), `expiry` (the deadline heap and its
timer), `journal` (event seq, group commit, watch hub), `metrics` (Prometheus series),
`leak_checks` (NVML processes vs holders) — with `leases` (types and named errors), `store`
(SQLite lease table + group-commit writer), `events` (WatchLeases fan-out), `inventory` (NVML or
CPU devices), `leaks` (who holds GPU memory without a lease). `cli` is the `lease`
command; the Python client library is `mocap_common.lease_client`.
"""
