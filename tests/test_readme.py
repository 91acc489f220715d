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
