"""The upload probe on the videos people actually have: phone clips report their upright size,
files without a picture are refused. Clips are made with ffmpeg at test time (tests/video_corpus.py)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from gateway.probe import ProbeError, probe_video
from tests.gateway.helpers import rpc_error
from tests.video_corpus import clip, make_clip, reference, require_tools


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_phone_video_is_probed_upright(rotation: int, tmp_path: Path) -> None:
    phone = clip(f"phone_rotate_{rotation}")
    path = make_clip(phone, require_tools(phone), tmp_path)
    coded = reference(path, slot_timed=False)
    assert (coded.width, coded.height) == ((362, 640) if rotation != 180 else (640, 362))  # as stored
    result = probe_video(path)
    assert (result.width, result.height) == phone.upright_size == (640, 362)  # as shown
    assert result.frame_count == 45 and result.fps == pytest.approx(30.0)


def test_audio_only_is_not_a_video(tmp_path: Path) -> None:
    audio = clip("audio_only")
    with pytest.raises(ProbeError) as caught:
        probe_video(make_clip(audio, require_tools(audio), tmp_path))
    assert caught.value.reason == "NOT_A_VIDEO" and "no video stream" in caught.value.message


async def test_upload_reports_the_upright_size_and_refuses_audio_only(client, tmp_path: Path) -> None:
    source = require_tools()
    phone = await client.upload(make_clip(clip("phone_rotate_90"), source, tmp_path).read_bytes(), filename="phone.mp4")
    assert (phone.video.width, phone.video.height) == (640, 362)
    refused = await rpc_error(client.upload(make_clip(clip("audio_only"), source, tmp_path).read_bytes(),
                                            filename="song.m4a"))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and refused.reason == "NOT_A_VIDEO"
