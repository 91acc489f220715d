"""`python -m mmpl_fast.generate`: a real mp4 from the default model (bad flags: `test_bad_inputs.py`)."""

from __future__ import annotations

import subprocess
import sys

import imageio.v3 as iio
import numpy as np

from mmpl_fast import embedded, generate

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
                 "--batch-segments", "--components", "--quiet", "--kind", "--sampler", "--shift"]:  # fmt: skip
        assert flag in text
