"""The README's Python example runs as written.

The block writes its own stand-in weights first (tiny random components saved in the real layouts: a diffusers
Wan2.1 folder and a bare Self-Forcing safetensors), then loads and calls them exactly as it would real ones. The
test takes the block from README.md and runs it in a fresh folder, in a fresh interpreter, as a user would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mmpl_fast

ROOT = Path(mmpl_fast.__file__).resolve().parent.parent


def python_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using it") :]
    section = section[: section.index("\n## ", 1)]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def test_the_example_shows_the_drop_in_inputs():
    code = python_example()
    for needle in ("latents=", "prompt_embeds=", ".safetensors", "generator=", "from_pretrained("):
        assert needle in code


def test_the_readme_python_example_runs_as_written(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)  # as a user runs it
    out = subprocess.run([sys.executable, "-c", python_example()], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=1800)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "self_forcing_dmd.safetensors").is_file()
    assert (tmp_path / "Wan2.1-T2V-1.3B-Diffusers" / "model_index.json").is_file()
    assert re.findall(r"segment (\d): (\d+) frames", out.stdout) == [("0", "81"), ("1", "76")]


def _make_strips():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_strips", ROOT / "docs" / "make_strips.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_opens_with_the_strips_of_its_first_command():
    """Right under the two set-up commands: the contact sheets docs/make_strips.py writes, small enough to ship."""
    import imageio.v3 as iio

    from mmpl_fast import preview, world

    text = (ROOT / "README.md").read_text()
    second_block_end = [m.end() for m in re.finditer(r"```bash\n.*?```", text, flags=re.S)][1]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text[second_block_end : text.index("\n## ")])
    assert images == ["docs/strip_readme.png", "docs/strip_story.png"]
    assert "python docs/make_strips.py" in text[second_block_end : text.index("\n## ")]
    for name in images:
        path = ROOT / name
        assert path.stat().st_size < 300_000, name
        assert iio.imread(path).shape[1::-1] == preview.sheet_size(10, 64, 64, title=True), name
    strips = _make_strips()
    prompt, seconds = strips.readme_command()
    assert seconds == 10 and world.parse_caption(prompt)[0] == "black"
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert f'--prompt "{prompt}"' in first_block
    # the story changes its prompt mid-way, and every prompt is one the world's grammar knows
    times = [t for t, _ in strips.STORY]
    assert times[0] == 0 and 0 < times[-1] < strips.STORY_SECONDS and len({p for _, p in strips.STORY}) > 1
    for _, p in strips.STORY:
        world.parse_caption(p)


def test_make_strips_runs_generate_with_preview(tmp_path, capsys):
    strips = _make_strips()
    assert strips.main(["--dry-run", "--docs", str(tmp_path), "--videos", str(tmp_path / "v")]) == 0
    readme, story = capsys.readouterr().out.strip().splitlines()
    assert "-m mmpl_fast.generate" in readme and f"--preview {tmp_path / 'strip_readme.png'}" in readme
    assert "--prompts-file" in story and f"--preview {tmp_path / 'strip_story.png'}" in story
    assert (tmp_path / "v" / "story.txt").read_text().count("\t") == len(strips.STORY)
    assert not list(tmp_path.glob("*.png"))  # a dry run writes no picture
