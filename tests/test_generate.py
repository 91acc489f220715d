"""`python -m mmpl_fast.generate`: a real mp4 from the default model (bad flags: `test_bad_inputs.py`)."""

from __future__ import annotations

import subprocess
import sys

import imageio.v3 as iio
import numpy as np

from mmpl_fast import embedded, generate, preview

SMALL = ["--height", "32", "--width", "32", "--quiet"]


def test_cli_writes_mp4_with_right_frames_and_size(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    rc = generate.main(["--prompt", "a red circle", "--num-frames", "90", "--out", str(out), *SMALL])
    assert rc == 0
    frames = iio.imread(out)
    assert frames.shape == (90, 32, 32, 3)
    assert not list(tmp_path.glob(".*partial*"))
    text = capsys.readouterr()
    assert "90 frames" in text.out and "frames/s" in text.out and "peak memory" in text.out
    assert "trimming to 90" in text.err  # 2 segments generated (157 frames), trimmed, and said so
    if not embedded.available():  # a checkout without the trained weights says it runs the random preset
        assert "random 'tiny' preset" in text.err


def test_cli_preview_writes_a_contact_sheet_named_on_the_last_line(tmp_path, capsys):
    out, png = tmp_path / "v.mp4", tmp_path / "v.png"
    rc = generate.main(["--prompt", "a red circle", "--num-frames", "90", "--out", str(out), "--preview", str(png),
                        *SMALL])  # fmt: skip
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"wrote {png}: contact sheet of 10 frames over 5.6 s" and lines[-2].startswith(f"wrote {out}")
    sheet = iio.imread(png)
    count = generate.PREVIEW_FRAMES
    assert sheet.shape[1::-1] == preview.sheet_size(count, 32, 32, title=True) == (count * 128 + (count + 1) * 4, 172)
    video = iio.imread(out)  # each tile is the video's frame at its time (up to the mp4's compression)
    top = preview.TITLE_HEIGHT + preview.GAP
    for k, index in enumerate(preview.frame_indices(90, count)):
        x = preview.GAP + k * (128 + preview.GAP)
        tile = sheet[top : top + 128 : 4, x : x + 128 : 4].astype(float)
        assert np.abs(tile - video[index]).mean() < 8, k


def test_cli_timeline_devices_and_policy(tmp_path, capsys):
    out, png = tmp_path / "v.mp4", tmp_path / "run.png"
    rc = generate.main(["--prompt", "a red circle", "--num-frames", "157", "--out", str(out), "--timeline", str(png),
                        "--devices", "cpu,cpu", "--policy", "round-robin", *SMALL])  # fmt: skip
    assert rc == 0 and iio.imread(out).shape[0] == 157
    assert png.stat().st_size > 1000 and "timeline" in capsys.readouterr().out


def test_cli_prompts_file_and_image_start(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    img = tmp_path / "start.png"
    iio.imwrite(img, np.full((32, 32, 3), 128, np.uint8))
    out = tmp_path / "v.mp4"
    rc = generate.main(["--prompts-file", str(prompts), "--num-frames", "157", "--image", str(img), "--out", str(out),
                        *SMALL])  # fmt: skip
    assert rc == 0 and iio.imread(out).shape[0] == 157


def test_cli_help_documents_every_flag():
    text = subprocess.run([sys.executable, "-m", "mmpl_fast.generate", "--help"], capture_output=True, text=True).stdout
    for flag in ["--prompt", "--prompts-file", "--seconds", "--num-frames", "--mode", "--layout", "--steps",
                 "--guidance", "--seed", "--height", "--width", "--image", "--video", "--model", "--out",
                 "--workdir", "--device", "--chain", "--negative-prompt", "--devices", "--policy", "--timeline",
                 "--batch-segments", "--components", "--quiet", "--kind", "--sampler", "--shift",
                 "--preview"]:  # fmt: skip
        assert flag in text
