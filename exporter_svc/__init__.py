"""exporter_svc — skeleton solve and animation export (BVH natively, FBX and GLB through Blender).

    python -m exporter_svc [--port 50054] [--blender-timeout-s 300] [--work-dir DIR] ...

Reading order (each module's docstring says what it does and why):
    config.py        ExporterConfig (MOCAP_EXPORTER_* variables, flags)
    server.py        the gRPC adapter for ExporterService.Export (thin)
    intake.py        reads and validates the request stream (header, pose chunks, video bytes)
    export.py        one export start to finish: solve → BVH → Blender ‖ preview → quality
    timeline.py      variable frame rate / gaps → a constant-rate timeline
    rootpath.py      the performer's path from the image (pinhole, nominal field of view)
    skeleton.py      the humanoid armature: names, hierarchy, T-pose rest, axes
    solve.py         landmarks → bone lengths → joint rotations (→ feet.py)
    feet.py          floor plane, contacts, foot locking (leg IK + hip drop)
    rotations.py     frames from vectors, quaternions and BVH Euler angles without flips or wraps
    bvh_writer.py    native BVH writer
    blender_job.py   parent side of the Blender child: spec, process group, timeout, results
    blender_child.py child side: `import bpy`, armatures + actions, FBX / GLB export
    preview.py       preview MP4 via the shared overlay renderer (mocap_common.overlay)
    quality.py       TrackQuality / SolveQuality figures and the JSON quality report
    workspace.py     per-call temporary directories, removed on every path
Domain modules import no grpc; errors are mocap_common.errors.ServiceError subclasses.
"""
