"""`python -m mmpl_fast.generate`: write a video from a prompt.

Without --model it runs the embedded tiny model on the CPU; with --model it loads a diffusers-format
Wan2.1 folder, or a transformer checkpoint (original Wan, diffusers, Self-Forcing/MMPL .pt) whose other
components (tokenizer, text encoder, VAE) come from --components.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from . import distributed, preview
from .layouts import LAYOUTS
from .pipeline import FPS, KINDS, MODES, Pipeline, VideoStream
from .request import SEED_LIMIT, check_device, check_workdir, load_media
from .sampling import SAMPLERS

PREVIEW_FRAMES = 10  # frames on a --preview contact sheet
DTYPE_CHOICES = ("bf16", "fp16", "fp32", "bfloat16", "float16", "float32")  # `request.DTYPES` names
EXAMPLE = (
    'python -m mmpl_fast.generate --prompt "a red circle bouncing on a blue background" --seconds 10 --out out.mp4'
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmpl_fast.generate",
        description="Generate a long video with MMPL (plan keyframes, then populate segments) or plain AR.",
        epilog=f"example: {EXAMPLE}",
    )
    g = p.add_argument_group("what to generate")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt for the whole video")
    src.add_argument(
        "--prompts-file",
        help="text file, one prompt per line, one line per segment; or lines 'SECONDS<TAB>PROMPT' to switch "
        "prompts at those times",
    )
    g.add_argument("--negative-prompt", default=None, help="negative prompt for guidance (default: empty)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=_finite, help=f"video length in seconds at {FPS} fps")
    length.add_argument("--num-frames", type=int, help="video length in frames (default 81, one segment)")
    g.add_argument("--image", help="start the video from this image (video continuation / image-to-video)")
    g.add_argument("--video", help="continue this video clip (its last frames start the first segment)")
    g.add_argument("--height", type=int, help="pixels, multiple of 16 (default: the model's usual size)")
    g.add_argument("--width", type=int, help="pixels, multiple of 16 (default: the model's usual size)")

    h = p.add_argument_group("how")
    h.add_argument("--mode", choices=list(MODES), default="mmpl", help="mmpl: plan then populate; ar: blocks of 3")
    h.add_argument("--layout", help=f"layout name ({', '.join(LAYOUTS)}, arN); overrides --mode's layout")
    h.add_argument("--chain", choices=["terminal", "middle"], default="terminal",
                   help="next segment starts from the terminal keyframes, or the middle ones (less work: the "
                        "populate stage after them is skipped)")  # fmt: skip
    h.add_argument("--steps", type=int, help="denoising steps per stage (default by checkpoint kind)")
    h.add_argument("--guidance", type=_finite, help="classifier-free guidance scale (default by checkpoint kind)")
    h.add_argument("--sampler", choices=list(SAMPLERS), help="few-step, unipc or euler (default by checkpoint kind)")
    h.add_argument("--shift", type=_finite, help="timestep shift (default by checkpoint kind)")
    h.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    h.add_argument("--batch-segments", type=int, default=4,
                   help="at most this many segments hold KV pages on a device at once, and so are populated in one "
                   "batched launch (default 4)")  # fmt: skip
    h.add_argument("--policy", choices=["adaptive", "round-robin", "cp-first"], default="adaptive",
                   help="how the scheduler places and orders tasks on the devices (default adaptive)")  # fmt: skip

    m = p.add_argument_group("model and output")
    m.add_argument("--model", help="diffusers Wan2.1 folder, or a transformer checkpoint (then also --components); "
                   "default: the embedded tiny model")  # fmt: skip
    m.add_argument("--components", help="diffusers Wan2.1 folder supplying tokenizer, text encoder and VAE")
    m.add_argument("--kind", choices=list(KINDS),
                   help="what the weights are, which sets the sampling defaults: a .pt checkpoint is taken for "
                   "Self-Forcing (4 few-step steps, no guidance); pass --kind mmpl for MMPL's released weights "
                   "(50 UniPC steps, shift 5, guidance 5); default: from the folder or the format")  # fmt: skip
    m.add_argument("--out", default="out.mp4", help="output .mp4 (written under a temporary name, then renamed)")
    m.add_argument("--workdir", help="save finished segments here; rerunning the same command resumes")
    m.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    m.add_argument("--dtype", choices=list(DTYPE_CHOICES), default=None,
                   help="the weights', KV cache's and activations' dtype (DiT, VAE, text encoder); the timestep "
                   "sinusoid, RoPE and the sampler's latents stay float64/float32 (default: bf16 on CUDA, fp32 on "
                   "a CPU)")  # fmt: skip
    m.add_argument("--offload", action="store_true",
                   help="keep the text encoder on the CPU (prompts are encoded once there, only their embeddings "
                   "go to the GPU): umT5-XXL needs no GPU memory (as diffusers' enable_model_cpu_offload)")  # fmt: skip
    m.add_argument("--devices", default=None,
                   help="several devices of this process, comma-separated (cuda:0,cuda:1): each gets a copy of "
                   "the model and the scheduler spreads the segments' stages over them; under torchrun each rank "
                   "uses one device instead")  # fmt: skip
    m.add_argument("--timeline", default=None, help="write a Gantt chart (PNG) of what the run did, per device")
    m.add_argument("--preview", default=None, metavar="PATH.png",
                   help=f"also write a contact sheet: {PREVIEW_FRAMES} frames evenly spaced over the video, each "
                   "labelled with its time (the last line printed names it)")  # fmt: skip
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def _finite(text: str) -> float:
    """argparse type: a finite float (nan and inf are refused with the flag named)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _read_prompts(path: str) -> dict:
    f = Path(path)
    if not f.exists():
        raise FileNotFoundError(f"--prompts-file not found: {f}")
    if not f.is_file():
        raise ValueError(f"--prompts-file {f} is a folder; expected a text file")
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--prompts-file {f} is not a UTF-8 text file") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"--prompts-file {f} holds no prompts")
    if all("\t" in ln for ln in lines):
        sched = []
        for ln in lines:
            t, prompt = ln.split("\t", 1)
            try:
                sched.append((_finite(t), prompt.strip()))
            except argparse.ArgumentTypeError:
                raise ValueError(f"--prompts-file {f}: {t!r} is not a finite number of seconds") from None
        return {"prompt_schedule": sched}
    return {"segment_prompts": lines}


def _check_out(path: str, suffix: str = ".mp4", flag: str = "--out") -> Path:
    out = Path(path)
    if out.suffix.lower() != suffix:
        raise ValueError(f"{flag} {out}: only {suffix} output is supported")
    if out.is_dir():
        raise ValueError(f"{flag} {out} is a folder; expected a {suffix} file name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        why = "is a file, not a folder" if parent.exists() else "does not exist"
        raise ValueError(f"{flag} {out}: folder {parent} {why}")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"{flag} {out}: not writable")
    return out


def _media(args) -> dict:
    if args.image:
        return {"image": load_media(args.image, "--image", clip=False)}
    if args.video:
        return {"video": load_media(args.video, "--video", clip=True)}
    return {}


def load_pipeline(model: str | None, components: str | None, device: str, kind: str | None = None,
                  dtype: str | None = None, offload: bool = False) -> Pipeline:  # fmt: skip
    """The pipeline --model / --components name (default: the embedded model), in `dtype` (--dtype; default:
    bf16 on CUDA, fp32 on a CPU), with the text encoder on the CPU when `offload`."""
    opts = dict(kind=kind, torch_dtype=dtype, offload=offload)
    if model is None:
        from . import embedded

        return embedded.load_pipeline(device=device, **opts)
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"--model not found: {path}")
    if path.is_dir() and (path / "model_index.json").exists():
        return Pipeline.from_pretrained(path, device=device, **opts)
    if components is None:
        raise ValueError(f"--model {path} is a transformer checkpoint: pass --components DIR (a diffusers Wan2.1 "
                         "folder with tokenizer, text_encoder and vae)")  # fmt: skip
    if not Path(components).is_dir():
        what = "is a file" if Path(components).exists() else "does not exist"
        raise ValueError(f"--components {components} {what}; expected a diffusers Wan2.1 pipeline folder")
    return Pipeline.from_pretrained(components, transformer=path, device=device, **opts)


def _check_flags(args) -> dict:
    """Every check that needs no model (so a bad flag fails in a second, before the model loads); returns what
    the run needs: frames, prompts, media, the output paths and the device."""
    if args.seconds is not None and not args.seconds > 0:
        raise ValueError(f"--seconds must be > 0, got {args.seconds}")
    num_frames = args.num_frames if args.num_frames is not None else 81
    if args.seconds is not None:
        num_frames = round(args.seconds * FPS) + 1
    if num_frames <= 0:
        raise ValueError(f"--num-frames must be > 0, got {num_frames}")
    for name in ("height", "width", "steps", "batch_segments"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v}")
    if args.guidance is not None and args.guidance < 0:
        raise ValueError(f"--guidance must be >= 0, got {args.guidance}")
    if args.shift is not None and not args.shift > 0:
        raise ValueError(f"--shift must be > 0, got {args.shift}")
    if not 0 <= args.seed < SEED_LIMIT:
        raise ValueError(f"--seed must be >= 0 and < 2**63, got {args.seed}")
    if args.image and args.video:
        raise ValueError("pass --image or --video, not both")
    out = _check_out(args.out)
    for flag in ("timeline", "preview"):
        if getattr(args, flag) is not None:
            _check_out(getattr(args, flag), suffix=".png", flag=f"--{flag}")
    pngs = [Path(f).resolve() for f in (args.timeline, args.preview) if f is not None]
    if len(pngs) == 2 and pngs[0] == pngs[1]:
        raise ValueError(f"--preview {args.preview}: the same file as --timeline")
    check_workdir(args.workdir, "--workdir")
    prompts = {"prompt": args.prompt} if args.prompt is not None else _read_prompts(args.prompts_file)
    if "prompt" in prompts and not args.prompt.strip():
        raise ValueError("--prompt is empty")
    devices = _split_devices(args.devices)
    if devices and args.device and args.device != devices[0]:
        raise ValueError(f"--device {args.device} and --devices {args.devices}: the first of --devices is the "
                         "main device; pass one of them")  # fmt: skip
    if args.device is not None:
        check_device(args.device, "--device")
    device = (devices[0] if devices else args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    return dict(num_frames=num_frames, prompts=prompts, media=_media(args), out=out, devices=devices, device=device)


def _prepare(args) -> tuple[Pipeline, VideoStream, Path]:
    """Checks, the pipeline, and the checked call (`Pipeline.stream` refuses bad arguments before any work)."""
    run = _check_flags(args)
    device = run["device"]
    if distributed.init_from_env(device) and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # torchrun: one GPU per local rank
    pipe = load_pipeline(args.model, args.components, device, args.kind, args.dtype, args.offload)
    stream = pipe.stream(
        negative_prompt=args.negative_prompt, height=args.height, width=args.width, num_frames=run["num_frames"],
        num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, shift=args.shift,
        seed=args.seed, mode=args.mode, layout=args.layout, chain=args.chain, batch_segments=args.batch_segments,
        workdir=args.workdir, policy=args.policy, devices=run["devices"], progress=not args.quiet,
        output_type="np", **run["prompts"], **run["media"],
    )  # fmt: skip
    return pipe, stream, run["out"]


def _write(stream: VideoStream, out: Path, picked: dict | None = None) -> int:
    """Write the stream's frames to `out` through a temporary file renamed at the end (nothing is left behind
    when the run fails); the number of frames written. With `picked` (a dict), the frames a contact sheet shows
    (`preview.frame_indices` of the video's length) are kept in it, by index."""
    import imageio.v2 as imageio

    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
    written = 0
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = next(stream)  # the pre-flight memory check runs here, before the file is opened
        for w in caught:
            print(f"note: {w.message}", file=sys.stderr)
        keep = set() if picked is None else set(preview.frame_indices(stream.info["video_frames"], PREVIEW_FRAMES))
        with imageio.get_writer(tmp, fps=FPS, codec="libx264", quality=8, macro_block_size=1) as writer:
            for seg in itertools.chain([first], stream):
                for frame in seg.frames:
                    pixels = (frame * 255).round().astype(np.uint8)
                    writer.append_data(pixels)
                    if written in keep:
                        picked[written] = pixels
                    written += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return written


def _report(args, pipe: Pipeline, info: dict, out: Path, written: int, wall: float) -> None:
    if args.timeline is not None and "measured" in info:
        from .scheduler import plot_timeline

        measured = info["measured"]
        plot_timeline(measured, args.timeline, title=f"{measured.policy}: {info.get('num_segments')} segments, "
                      f"{measured.makespan:.1f} s")  # fmt: skip
        print(f"wrote {args.timeline}: the run's timeline, per device")
    if torch.cuda.is_available() and str(pipe.device).startswith("cuda"):
        peak = f"{torch.cuda.max_memory_allocated(pipe.device) / 2**30:.2f} GiB GPU"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
    print(
        f"wrote {out}: {written} frames ({written / FPS:.1f} s at {FPS} fps, {info.get('num_segments')} segments, "
        f"layout {info.get('layout')}, seed {info.get('seed')}) in {wall:.1f} s = {written / wall:.2f} frames/s; "
        f"peak memory {peak}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a bad flag or input exits with status 2 and one line naming it, writing nothing."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        pipe, stream, out = _prepare(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        _fail(parser, str(e))
    if distributed.rank() != 0:  # torchrun: rank 0 writes the video, the others only compute
        for _ in stream:
            pass
        return 0
    start = time.perf_counter()
    picked = None if args.preview is None else {}
    try:
        written = _write(stream, out, picked)
    except (ValueError, TypeError, FileNotFoundError) as e:
        _fail(parser, str(e))
    _report(args, pipe, stream.info, out, written, time.perf_counter() - start)
    if picked:  # the last line names the sheet
        preview.write_sheet(picked, args.preview, fps=FPS, title=_title(args))
        print(f"wrote {args.preview}: contact sheet of {len(picked)} frames over {written / FPS:.1f} s")
    return 0


def _title(args) -> str:
    """The prompt(s) of the run, in one line (a contact sheet's title)."""
    if args.prompt is not None:
        return args.prompt
    prompts = _read_prompts(args.prompts_file)
    if "prompt_schedule" in prompts:
        return " | ".join(f"{t:g} s: {p}" for t, p in prompts["prompt_schedule"])
    return " | ".join(f"segment {k}: {p}" for k, p in enumerate(prompts["segment_prompts"]))


def _split_devices(text: str | None) -> list[str] | None:
    if text is None:
        return None
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise ValueError(f"--devices {text!r}: expected a comma-separated list such as cuda:0,cuda:1")
    for d in devices:
        check_device(d, "--devices: device")
    return devices


if __name__ == "__main__":
    sys.exit(main())
