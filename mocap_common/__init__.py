"""Shared plumbing for every mocap mesh service.

One place for what all five services do the same way: server bootstrap (health, reflection,
interceptors, graceful shutdown), configuration, structured logging, metrics, rich gRPC errors,
the pose-track data model and the lease client; and what two services need, since services never
import each other: the skeleton overlay renderer (`overlay`: tracker debug overlays, exporter
previews; needs PyAV) and the .npz pose-track format (`trackio`: the tracker writes, the smoother's
noise measurement reads). This file imports nothing, so every service can load the package.
"""
