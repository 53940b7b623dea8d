"""The package's shape: inference imports neither the training engine nor Lightning."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import sevenpoint.infer


def test_no_inference_module_loads_the_training_engine_or_lightning():
    modules = [m.name for m in pkgutil.iter_modules(sevenpoint.infer.__path__, "sevenpoint.infer.")]
    assert {"sevenpoint.infer.predict", "sevenpoint.infer.artifacts", "sevenpoint.infer.export"} <= set(modules)
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')\n"
            "             or m.startswith('sevenpoint.engine'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"inference modules pulled in: {out}"
