"""Make the README's pictures: contact sheets of two videos of the embedded model.

    python docs/make_strips.py            # writes docs/strip_readme.png and docs/strip_story.png
    python docs/make_strips.py --dry-run  # only prints the two commands

* ``strip_readme.png``: the README's first command (its prompt and length, read from README.md, so the picture
  follows the README) run through ``python -m mmpl_fast.generate ... --preview``;
* ``strip_story.png``: a ``--prompts-file`` video whose prompt changes mid-way (`STORY`: a second shape is
  asked for from 5 s on; a prompt takes effect at the first segment that starts after its time, here the
  second segment, at 5.06 s).

Both use the default seed and the checkout's own code and embedded model; the videos go to a temporary folder
(``--videos DIR`` keeps them).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORY = (  # 'SECONDS<TAB>PROMPT' lines: --prompts-file's timed form
    (0.0, "a large red circle bouncing on a black background"),
    (5.0, "a large red circle bouncing and a small yellow square moving left on a black background"),
)
STORY_SECONDS = 10.0


def readme_command(readme: Path = ROOT / "README.md") -> tuple[str, float]:
    """(prompt, seconds) of the README's first command (its first bash block)."""
    text = readme.read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    if block is None:
        raise ValueError(f"{readme}: no bash block")
    prompt = re.search(r'--prompt "([^"]+)"', block.group(1))
    seconds = re.search(r"--seconds (\S+)", block.group(1))
    if prompt is None or seconds is None:
        raise ValueError(f'{readme}: the first bash block has no --prompt "..." and --seconds N')
    return prompt.group(1), float(seconds.group(1))


def commands(docs: Path, videos: Path) -> list[list[str]]:
    """The two `generate` command lines (the story's prompts file is `videos`/story.txt)."""
    prompt, seconds = readme_command()
    generate = [sys.executable, "-m", "mmpl_fast.generate", "--quiet"]
    return [
        [*generate, "--prompt", prompt, "--seconds", f"{seconds:g}", "--out", str(videos / "readme.mp4"),
         "--preview", str(docs / "strip_readme.png")],
        [*generate, "--prompts-file", str(videos / "story.txt"), "--seconds", f"{STORY_SECONDS:g}",
         "--out", str(videos / "story.mp4"), "--preview", str(docs / "strip_story.png")],
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python docs/make_strips.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where the PNGs go (default: this folder)")
    p.add_argument("--videos", default=None, help="keep the two mp4s in this folder (default: a temporary one)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        videos = Path(args.videos or tmp)
        videos.mkdir(parents=True, exist_ok=True)
        (videos / "story.txt").write_text("".join(f"{t:g}\t{prompt}\n" for t, prompt in STORY), encoding="utf-8")
        for cmd in commands(Path(args.docs), videos):
            print(" ".join(f'"{c}"' if " " in c else c for c in cmd), flush=True)
            if args.dry_run:
                continue
            done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                return done.returncode
            print(done.stdout.strip().splitlines()[-1], flush=True)  # "wrote ...png: contact sheet ..."
    return 0


def _env() -> dict:
    """This checkout's code first on the path (not an installed copy elsewhere)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


if __name__ == "__main__":
    sys.exit(main())
