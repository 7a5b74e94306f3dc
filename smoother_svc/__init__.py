"""smoother_svc: temporal filtering of pose tracks, gap filling, quality figures, and a learned
smoother trained under a training lease.

Reading order: `config` → `server` (gRPC adapter: decode, call, encode, one error table) →
`service` (the service layer: smoothing pool, metrics, frame rate, training defaults) →
`presets` (which method and parameters) →
`smoothing` (whole tracks: gaps, weights, filters, metrics) → `gaps`, `filters`, `smoothnet`,
`metrics`; training: `trainer` (lease + thread) → `training` (loop) → `checkpoints`;
data: `noise` (tracker-shaped noise, measured), `reference_data` (CMU clips).
"""
