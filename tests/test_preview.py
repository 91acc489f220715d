"""Contact sheets (`mmpl_fast.preview`): evenly spaced frames, scaled by a whole factor, each labelled."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from mmpl_fast import preview, world


def test_frame_indices_span_the_video():
    assert preview.frame_indices(161, 10) == [0, 18, 36, 53, 71, 89, 107, 124, 142, 160]
    assert preview.frame_indices(4, 10) == [0, 1, 2, 3]  # a short video: every frame once
    assert preview.frame_indices(1, 10) == [0] and preview.frame_indices(50, 1) == [0]
    with pytest.raises(ValueError, match="count"):
        preview.frame_indices(10, 0)


@pytest.mark.parametrize("count, size, title", [(10, 64, None), (4, 48, "a title"), (3, 200, None)])
def test_contact_sheet_shows_the_frames_at_their_times(tmp_path, count, size, title):
    frames = world.render(world.sample_scene(5), 81, size, size)
    path = preview.contact_sheet(frames, tmp_path / "s.png", count=count, title=title)
    sheet = iio.imread(path)
    scale = max(1, -(-128 // size))  # 64 -> 2, 48 -> 3, 200 -> 1
    tile = size * scale
    top = (preview.TITLE_HEIGHT if title else 0) + preview.GAP
    assert sheet.shape == (top + tile + preview.LABEL_HEIGHT, count * tile + (count + 1) * preview.GAP, 3)
    assert sheet.shape[1::-1] == preview.sheet_size(count, size, size, title=title is not None)
    for k, index in enumerate(preview.frame_indices(81, count)):  # each tile is its frame, scaled up exactly
        x = preview.GAP + k * (tile + preview.GAP)
        assert np.array_equal(sheet[top : top + tile : scale, x : x + tile : scale], frames[index]), k
    assert preview.frame_indices(81, count)[-1] == 80  # the last frame closes the strip
    label = sheet[top + tile :, preview.GAP : preview.GAP + tile]
    assert (label != preview.BACKGROUND).any()  # its time is written under it


def test_contact_sheet_takes_float_frames_and_refuses_bad_input(tmp_path):
    frames = world.render(world.sample_scene(2), 9, 32, 32)
    a = iio.imread(preview.contact_sheet(frames, tmp_path / "a.png", count=3))
    b = iio.imread(preview.contact_sheet(frames / 255.0, tmp_path / "b.png", count=3))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match=r"\.png"):
        preview.contact_sheet(frames, tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="frames"):
        preview.contact_sheet(frames[0], tmp_path / "c.png")
    with pytest.raises(ValueError, match="fps"):
        preview.contact_sheet(frames, tmp_path / "c.png", fps=0)
    assert not (tmp_path / "c.png").exists()
