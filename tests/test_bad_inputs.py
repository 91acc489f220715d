"""Every bad input is refused before any work starts, with one line naming the value and what is allowed.

The classes issue 13 names are all here: non-finite numbers for float options, files that exist but are not
images or videos, device strings torch does not know (or that cannot run here), paths that exist as the wrong
kind of thing, and sizes that cannot fit in memory (on a CPU too: the pre-flight reads the RAM available).

CLI cases run `generate.main` and check: exit status 2, the message on one ``error:`` line, and nothing left
behind (no output file, no partial file, no workdir). Loading the model is not what they test, so
`generate.load_pipeline` hands them one shared tiny pipeline (cases about --model / --components use the real
loader). Python cases call the pipeline with a workdir and check it was never created.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import mmpl_fast._generation as generation
from mmpl_fast import Pipeline, generate
from mmpl_fast.layouts import ar
from mmpl_fast.loading import load_transformer

SMALL = ["--height", "32", "--width", "32", "--quiet", "--num-frames", "9"]
SIZE = dict(height=32, width=32)
TINY_RAM = 1 << 20  # what a machine with 1 MiB available would report


@pytest.fixture(scope="module")
def tiny():
    return Pipeline.tiny(seed=0)


@pytest.fixture
def files(tmp_path):
    """Inputs the cases point at: real files of the wrong kind, folders, an image of the wrong size."""
    import imageio.v3 as iio

    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "noise.jpg").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "text.mp4").write_text("not a video")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "deep.png").write_bytes(b"")
    iio.imwrite(tmp_path / "deep.png", np.zeros((32, 32), np.uint16))
    iio.imwrite(tmp_path / "small.png", np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 16)
    (tmp_path / "nan.txt").write_text("0\ta red circle\nnan\ta blue square\n")
    (tmp_path / "inf.txt").write_text("0\ta red circle\ninf\ta blue square\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "two.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "file").write_text("a file where a folder is expected")
    (tmp_path / "weights.txt").write_text("1 2 3")
    for folder in ("v.mp4", "t.png", "dir.png", "dir.mp4", "prompts", "noweights"):
        (tmp_path / folder).mkdir()
    return tmp_path


# (flags, text the error line must hold); {tmp} is the test's folder
CLI_CASES = [
    # non-finite numbers
    (["--guidance", "nan"], "argument --guidance: 'nan' is not a finite number"),
    (["--guidance", "inf"], "argument --guidance: 'inf' is not a finite number"),
    (["--guidance=-inf"], "argument --guidance: '-inf' is not a finite number"),
    (["--guidance", "lots"], "argument --guidance: 'lots' is not a number"),
    (["--shift", "nan"], "argument --shift: 'nan' is not a finite number"),
    (["--shift", "Infinity"], "argument --shift: 'Infinity' is not a finite number"),
    (["--seconds", "nan"], "argument --seconds: 'nan' is not a finite number"),
    (["--seconds", "1e400"], "argument --seconds: '1e400' is not a finite number"),
    (["--prompts-file", "{tmp}/nan.txt"], "'nan' is not a finite number of seconds"),
    (["--prompts-file", "{tmp}/inf.txt"], "'inf' is not a finite number of seconds"),
    # files that exist but are not images or videos
    (["--image", "{tmp}/text.png"], "text.png is not an image file imageio can read"),
    (["--image", "{tmp}/empty.png"], "empty.png is not an image file imageio can read"),
    (["--image", "{tmp}/noise.jpg"], "noise.jpg is not an image file imageio can read"),
    (["--image", "{tmp}/deep.png"], "expected 8-bit RGB frames, got uint16"),
    (["--video", "{tmp}/text.mp4"], "text.mp4 is not a video file imageio can read"),
    (["--video", "{tmp}/empty.mp4"], "empty.mp4 is not a video file imageio can read"),
    (["--prompts-file", "{tmp}/binary.txt"], "binary.txt is not a UTF-8 text file"),
    # devices torch does not know, or that cannot run here
    (["--device", "gpu"], "--device 'gpu' is not a device torch knows"),
    (["--device", "cuda:x"], "--device 'cuda:x' is not a device torch knows"),
    (["--device", "cuda:-1"], "--device 'cuda:-1' is not a device torch knows"),
    (["--device", "tpu:0"], "--device 'tpu:0' is not a device torch knows"),
    (["--device", ""], "--device '' is not a device torch knows"),
    (["--device", "meta"], "--device 'meta': not a device that can run here"),
    (["--devices", "cpu,gpu"], "device 'gpu' is not a device torch knows"),
    (["--device", "cuda:7"], "--device 'cuda:7': CUDA is not available on this machine"),
    (["--devices", "cuda:5,cuda:6"], "device 'cuda:5': CUDA is not available on this machine"),
    # paths that exist as the wrong kind of thing
    (["--out", "{tmp}/v.mp4"], "v.mp4 is a folder; expected a .mp4 file name"),
    (["--out", "{tmp}/file/v.mp4"], "is a file, not a folder"),
    (["--timeline", "{tmp}/t.png"], "t.png is a folder; expected a .png file name"),
    (["--workdir", "{tmp}/file"], "--workdir {tmp}/file exists and is not a folder"),
    (["--workdir", "{tmp}/file/run"], "is a file, not a folder"),
    (["--image", "{tmp}/dir.png"], "--image {tmp}/dir.png is a folder; expected an image file"),
    (["--video", "{tmp}/dir.mp4"], "--video {tmp}/dir.mp4 is a folder; expected a video file"),
    (["--prompts-file", "{tmp}/prompts"], "--prompts-file {tmp}/prompts is a folder; expected a text file"),
    # sizes that cannot fit in memory (this machine's RAM, and a machine with 1 MiB available)
    (["--height", "65536", "--width", "65536"], "cannot run tiny at 65536x65536"),
    (["--ram"], "the most free memory is 0.0 GiB on cpu"),
    # the rest: values out of range, unknown names, missing files, contradictions
    (["--height", "0"], "--height must be > 0"),
    (["--width", "-32"], "--width must be > 0"),
    (["--height", "40"], "multiple of 16"),
    (["--num-frames", "0"], "--num-frames must be > 0"),
    (["--num-frames", "-5"], "--num-frames must be > 0"),
    (["--seconds", "-2"], "--seconds must be > 0"),
    (["--seconds", "0"], "--seconds must be > 0"),
    (["--steps", "0"], "--steps must be > 0"),
    (["--guidance", "-1"], "--guidance must be >= 0"),
    (["--shift", "0"], "--shift must be > 0"),
    (["--seed", "-5"], "--seed must be >= 0 and < 2**63"),
    (["--seed", str(2**63)], "--seed must be >= 0 and < 2**63"),
    (["--layout", "spiral"], "unknown layout"),
    (["--layout", "ar5"], "must be a positive multiple of block=5"),
    (["--image", "{tmp}/small.png"], "image frames are (16, 16), expected (32, 32)"),
    (["--image", "{tmp}/small.png", "--video", "{tmp}/text.mp4"], "pass --image or --video, not both"),
    (["--image", "/nonexistent.png"], "--image not found"),
    (["--video", "/nonexistent.mp4"], "--video not found"),
    (["--out", "/nonexistent-dir/v.mp4"], "does not exist"),
    (["--out", "{tmp}/v.gif"], "only .mp4"),
    (["--timeline", "{tmp}/t.jpg"], "only .png"),
    (["--batch-segments", "0"], "--batch-segments must be > 0"),
    (["--devices", ","], "comma-separated list"),
    (["--policy", "fifo"], "invalid choice"),
    (["--chain", "sideways"], "invalid choice"),
    (["--mode", "spiral"], "invalid choice"),
    (["--kind", "sdxl"], "invalid choice"),
    (["--sampler", "ddim"], "invalid choice"),
    (["--prompt", "   "], "--prompt is empty"),
    (["--prompts-file", "{tmp}/none.txt"], "--prompts-file not found"),
    (["--prompts-file", "{tmp}/empty.txt"], "holds no prompts"),
    (["--prompts-file", "{tmp}/two.txt"], "needs 1 segments"),
    # --preview: a .png in a folder that exists
    (["--preview", "{tmp}/nowhere/p.png"], "--preview {tmp}/nowhere/p.png: folder {tmp}/nowhere does not exist"),
    (["--preview", "{tmp}/file/p.png"], "folder {tmp}/file is a file, not a folder"),
    (["--preview", "{tmp}/p.jpg"], "--preview {tmp}/p.jpg: only .png output is supported"),
    (["--preview", "{tmp}/dir.png"], "--preview {tmp}/dir.png is a folder"),
    (["--preview", "{tmp}/same.png", "--timeline", "{tmp}/same.png"], "the same file as --timeline"),
]
# with the real loader
LOADER_CASES = [
    (["--model", "/nonexistent/model"], "--model not found"),
    (["--model", "{tmp}/noweights"], "is a transformer checkpoint: pass --components"),
    (["--model", "{tmp}/weights.txt", "--components", "{tmp}/file"], "--components {tmp}/file is a file"),
    (["--model", "{tmp}/weights.txt", "--components", "{tmp}/nowhere"], "--components {tmp}/nowhere does not exist"),
]


def run_cli(tmp, flags, capsys) -> str:
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    flags = [f.replace("{tmp}", str(tmp)) for f in flags]
    prompt = [] if "--prompt" in flags or "--prompts-file" in flags else ["--prompt", "a red circle"]
    out = [] if "--out" in flags else ["--out", str(tmp / "out.mp4")]
    work = [] if "--workdir" in flags else ["--workdir", str(tmp / "work")]
    length = [] if "--seconds" in flags else SMALL[-2:]
    with pytest.raises(SystemExit) as e:
        generate.main([*prompt, *SMALL[:-2], *length, *out, *work, *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before, "something was written"
    return line


def test_a_bad_preview_path_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(generate, "load_pipeline", load)
    line = run_cli(tmp_path, ["--preview", "{tmp}/missing/sheet.png"], capsys)
    assert "--preview" in line and "does not exist" in line


@pytest.mark.parametrize("flags, message", CLI_CASES, ids=[" ".join(f)[:60] for f, _ in CLI_CASES])
def test_cli_refuses_bad_input_with_status_2_and_writes_nothing(files, tiny, flags, message, capsys, monkeypatch):
    if any(f.startswith("cuda") for f in flags) and torch.cuda.is_available():
        pytest.skip("CUDA present: these devices may exist")
    monkeypatch.setattr(generate, "load_pipeline", lambda *a, **k: tiny)
    if flags == ["--ram"]:
        monkeypatch.setattr(generation, "_available_ram", lambda: TINY_RAM)
        flags = []
    line = run_cli(files, flags, capsys)
    assert message.replace("{tmp}", str(files)) in line


@pytest.mark.parametrize("flags, message", LOADER_CASES, ids=[" ".join(f)[:60] for f, _ in LOADER_CASES])
def test_cli_refuses_bad_model_paths(files, flags, message, capsys):
    assert message.replace("{tmp}", str(files)) in run_cli(files, flags, capsys)


def test_cli_without_a_prompt(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(["--out", str(tmp_path / "v.mp4"), *SMALL])
    assert e.value.code == 2 and "one of the arguments --prompt --prompts-file is required" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_there_are_enough_distinct_cli_cases():
    cases = [tuple(f) for f, _ in CLI_CASES + LOADER_CASES]
    assert len(set(cases)) == len(cases) >= 40


# ------------------------------------------------------------------------------------------ Python API
def _api_cases(tmp):
    nan, inf = math.nan, math.inf
    lat = torch.randn(1, 16, 21, 4, 4)
    return [
        # non-finite numbers
        (dict(guidance_scale=nan), ValueError, "guidance_scale must be a finite number >= 0, got nan"),
        (dict(guidance_scale=inf), ValueError, "guidance_scale must be a finite number >= 0, got inf"),
        (dict(shift=nan), ValueError, "shift must be a finite number > 0, got nan"),
        (dict(shift=-inf), ValueError, "shift must be a finite number > 0, got -inf"),
        (dict(prompt=None, prompt_schedule=[(0, "a"), (nan, "b")]), ValueError, "finite seconds >= 0"),
        (dict(latents=lat.index_fill(2, torch.tensor([3]), nan)), ValueError, "latents holds nan or inf"),
        (dict(prompt=None, prompt_embeds=torch.full((1, 4, 64), inf)), ValueError, "prompt_embeds holds nan or inf"),
        (dict(image=np.full((32, 32, 3), nan, np.float32)), ValueError, "must be finite and in [0, 1]"),
        (dict(image=np.full((32, 32, 3), 2.0, np.float32)), ValueError, "must be finite and in [0, 1]"),
        # files that exist but are not images or videos; folders where files are expected
        (dict(image=tmp / "text.png"), ValueError, "text.png is not an image file imageio can read"),
        (dict(video=tmp / "text.mp4"), ValueError, "text.mp4 is not a video file imageio can read"),
        (dict(image=str(tmp / "dir.png")), ValueError, "dir.png is a folder; expected an image file"),
        (dict(workdir=tmp / "file"), ValueError, "workdir {tmp}/file exists and is not a folder"),
        # devices
        (dict(devices=["gpu"]), ValueError, "device 'gpu' is not a device torch knows"),
        (dict(devices=["cpu", "cuda:x"]), ValueError, "device 'cuda:x' is not a device torch knows"),
        (dict(devices=["meta"]), ValueError, "not a device that can run here"),
        (dict(devices="cpu"), TypeError, "devices must be a non-empty list"),
        # memory
        (dict(height=65536, width=65536), ValueError, "cannot run tiny at 65536x65536"),
        # diffusers' inputs
        (dict(latents=lat[:, :, :20]), ValueError, "latents has shape [1, 16, 20, 4, 4]; expected"),
        (dict(latents=lat.numpy()), TypeError, "latents must be a float tensor"),
        (dict(prompt=None, prompt_embeds=torch.randn(1, 4, 32)), ValueError, "expected [P, L, 64]"),
        (dict(prompt_embeds=torch.randn(1, 4, 64)), ValueError, "pass exactly one of prompt=, prompt_embeds="),
        (dict(negative_prompt="x", negative_prompt_embeds=torch.randn(1, 4, 64)), ValueError, "not both"),
        (dict(negative_prompt_embeds=torch.randn(2, 4, 64)), ValueError, "has 2 rows but there are 1 prompts"),
        (dict(generator=[torch.Generator()] * 2), ValueError, "a list of 2 generators for 1 videos"),
        (dict(generator=[0]), TypeError, "generator[0] must be a torch.Generator"),
        (dict(generator=torch.Generator(), seed=1), ValueError, "either seed= or generator="),
        (dict(num_videos_per_prompt=0), ValueError, "num_videos_per_prompt must be an int >= 1"),
        (dict(num_videos_per_prompt=True), TypeError, "num_videos_per_prompt must be an int >= 1"),
        (dict(num_videos_per_prompt=2), ValueError, "a resumable run makes one video per call"),
        (dict(return_dict="yes"), TypeError, "return_dict must be True or False"),
        (dict(max_sequence_length=0), ValueError, "max_sequence_length must be an int >= 1"),
        (dict(guidance_scale=True), TypeError, "guidance_scale must be a finite number"),
        (dict(seed=2**63), ValueError, "seed must be < 2**63"),
        (dict(negative_prompt=["a", "b"]), ValueError, "negative_prompt has 2 entries but there are 1 prompts"),
        (dict(layout=ar(block=7), mode="ar", chain="middle"), ValueError, "no 'middle' handoff"),
        (dict(num_inference_step=4), TypeError, "Pipeline.__call__() got an unexpected keyword argument"),
    ]


API_IDS = [str(i) for i in range(len(_api_cases(Path("/nonexistent"))))]


@pytest.mark.parametrize("index", range(len(API_IDS)), ids=API_IDS)
def test_api_refuses_bad_input_before_any_work(files, tiny, index):
    kwargs, error, match = _api_cases(files)[index]
    call = dict(prompt="a red circle", num_frames=9, progress=False, profile=False, workdir=files / "work", **SIZE)
    call.update(kwargs)
    with pytest.raises(error) as e:
        tiny(**call)
    assert match.replace("{tmp}", str(files)) in str(e.value)
    assert "\n" not in str(e.value)
    assert not (files / "work").exists()


def test_there_are_enough_distinct_api_cases(tmp_path):
    cases = _api_cases(tmp_path)
    assert len(cases) == len(API_IDS) and len({repr(k) for k, _, _ in cases}) == len(cases) >= 20


def test_cpu_preflight_plans_with_the_ram_available(monkeypatch, tiny):
    assert generation._available_ram() > 0  # this Linux machine has /proc/meminfo
    assert generation._free_memory(torch.device("cpu")) == generation._available_ram()
    monkeypatch.setattr(generation, "_available_ram", lambda: TINY_RAM)
    with pytest.raises(ValueError) as e:
        tiny(prompt="a red circle", num_frames=9, progress=False, profile=False, **SIZE)
    m = str(e.value)
    assert "cannot run tiny at 32x32" in m and "GiB" in m and "the most free memory is 0.0 GiB on cpu" in m


def test_pipeline_construction_refuses_bad_devices_and_paths(tmp_path, tiny):
    with pytest.raises(ValueError, match="'gpu' is not a device torch knows"):
        Pipeline.tiny(device="gpu")
    tiny.save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="'tpu' is not a device torch knows"):
        Pipeline.from_pretrained(tmp_path / "p", device="tpu")
    with pytest.raises(ValueError, match="is a file; expected a diffusers pipeline folder"):
        Pipeline.from_pretrained(tmp_path / "p" / "model_index.json")
    with pytest.raises(ValueError, match="kind 'sdxl' is not one of"):
        Pipeline.from_pretrained(tmp_path / "p", kind="sdxl")
    with pytest.raises(ValueError, match="is a folder; expected a preset"):
        load_transformer(tmp_path / "p", config=tmp_path)


def test_without_a_text_encoder_prompts_need_embeddings(tiny):
    bare = Pipeline(tiny.transformer, tiny.vae.vae, kind="tiny")
    with pytest.raises(ValueError, match="no text encoder: pass prompt_embeds="):
        bare(prompt="a red circle", num_frames=9, **SIZE)
    with pytest.raises(ValueError, match="guidance_scale > 1 without a text encoder needs negative_prompt_embeds"):
        bare(prompt_embeds=torch.randn(1, 4, 64), guidance_scale=3.0, num_frames=9, **SIZE)
    with pytest.raises(ValueError, match="pass both text_encoder and tokenizer, or neither"):
        Pipeline(tiny.transformer, tiny.vae.vae, tiny.text.encoder, kind="tiny")
