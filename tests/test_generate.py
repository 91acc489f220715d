"""`python -m mmpl_fast.generate`: a real mp4 from the default model, and clear errors for bad flags."""

from __future__ import annotations

import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

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


BAD_FLAGS = [
    (["--height", "0"], "--height must be > 0"),
    (["--width", "-32"], "--width must be > 0"),
    (["--height", "40"], "multiple of 16"),
    (["--num-frames", "0"], "--num-frames must be > 0"),
    (["--seconds", "-2"], "--seconds must be > 0"),
    (["--seconds", "0"], "--seconds must be > 0"),
    (["--steps", "0"], "--steps must be > 0"),
    (["--guidance", "-1"], "--guidance must be >= 0"),
    (["--seed", "-5"], "--seed must be >= 0"),
    (["--layout", "spiral"], "unknown layout"),
    (["--model", "/nonexistent/model"], "--model not found"),
    (["--image", "/nonexistent.png"], "--image not found"),
    (["--video", "/nonexistent.mp4"], "--video not found"),
    (["--out", "/nonexistent-dir/v.mp4"], "does not exist"),
    (["--out", "{tmp}/v.gif"], "only .mp4"),
    (["--device", "cuda:7"], "CUDA is not available"),
    (["--batch-segments", "0"], "--batch-segments must be > 0"),
    (["--devices", "cuda:5,cuda:6"], "CUDA is not available"),
    (["--devices", ","], "comma-separated list"),
    (["--timeline", "{tmp}/t.jpg"], "only .png"),
    (["--policy", "fifo"], "invalid choice"),
    (["--chain", "sideways"], "invalid choice"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_cli_bad_flags_fail_cleanly_and_write_nothing(tmp_path, capsys, flags, message):
    if ("--device" in flags or "--devices" in flags) and __import__("torch").cuda.is_available():
        pytest.skip("CUDA present: these devices may exist")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    out = [] if "--out" in flags else ["--out", str(tmp_path / "v.mp4")]
    length = [] if {"--seconds", "--num-frames"} & set(flags) else ["--num-frames", "9"]
    with pytest.raises(SystemExit) as e:
        generate.main(["--prompt", "a red circle", *length, *SMALL, *out, *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_mode_choice_and_missing_prompt(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "two.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "sched.txt").write_text("0\ta red circle\nsoon\ta blue square\n")
    cases = [
        (["--prompt", "x", "--mode", "spiral"], "invalid choice"),
        ([], "one of the arguments --prompt --prompts-file is required"),
        (["--prompts-file", str(tmp_path / "none.txt")], "--prompts-file not found"),
        (["--prompts-file", str(tmp_path / "empty.txt")], "holds no prompts"),
        (["--prompts-file", str(tmp_path / "two.txt"), "--num-frames", "81"], "needs 1 segments"),
        (["--prompts-file", str(tmp_path / "sched.txt")], "is not a number of seconds"),
        (["--prompt", "   "], "--prompt is empty"),
        (["--prompt", "x", "--shift", "0"], "--shift must be > 0"),
        (["--prompt", "x", "--kind", "sdxl"], "invalid choice"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as e:
            generate.main([*flags, "--out", str(out / "v.mp4"), *SMALL])
        assert e.value.code == 2
        assert message in capsys.readouterr().err, flags
        assert list(out.iterdir()) == []
