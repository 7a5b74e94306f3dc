"""Shared plumbing for every mocap mesh service.

One place for what all five services do the same way: server bootstrap (health, reflection,
interceptors, graceful shutdown), configuration, structured logging, metrics, rich gRPC errors,
the pose-track data model and the lease client.
"""
