"""The README's main job runs end to end (a few steps, small sizes) and trains through the FP8 path."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_fp8_mlp_runs():
  cmd = [sys.executable, os.path.join(ROOT, "training", "train_fp8_mlp.py"), "--steps", "60", "--width", "64",
         "--batch", "128"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, f"train_fp8_mlp.py failed:\n{out.stdout}\n{out.stderr}"
  assert "flashrt_fp8_gemm" in out.stdout, out.stdout
  assert "1.00 bytes per weight" in out.stdout, out.stdout


def test_readme_python_blocks_run():
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
  assert len(blocks) >= 2, "README lost its examples"
  scope: dict = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README's own examples
  assert scope["y"].shape == (4, 128, 1024), scope["y"].shape
