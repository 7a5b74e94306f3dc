"""The gateway: mocap mesh's public job API.

Clients upload a video (CreateJob), watch the job (WatchJob), and download the animation files
(DownloadArtifact). The gateway keeps jobs in SQLite and their files under data/jobs/{job}/,
drives the tracker, smoother and exporter services, and cleans up after crashes and retention.

    __main__      entry point: `python -m gateway`
    config        every option with its default
    app           wiring, start and graceful stop
    server        the gRPC adapter (thin)
    service       the job API for one tenant
    uploads       CreateJob: streaming, resumable, validated uploads
    probe         what is in an uploaded video (PyAV)
    store         JobStore interface + SQLite (WAL) implementation
    events        persisted job events and their watchers
    orchestrator  the queue and workers
    pipeline      one job through Track → Smooth → Export: deadlines, retries, terminal states
    stage_api     the Stages interface the pipeline drives, its outputs and errors
    stages        the stage services over gRPC
    artifacts     the job's artifacts/: the exporter's files checked and stored, the gateway's own
    quality       the quality report merged from the stages' figures
    messages      stage messages made safe to show a client
    retention     startup sweep and periodic cleanup
    tenancy       bearer token → tenant
    layout        the files of a job
    jobs          ids, names, records, options
    client        the Python client library: connection, resumable upload, watch, checked download
    cli           the `mocap` command: arguments and the terminal UI
"""
