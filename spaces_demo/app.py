"""TarFlow / STARFlow demo: a Gradio app, and the Space's entry point (`app_file: app.py`).

    python spaces_demo/app.py                               # the MNIST model bundled with tarflow-hf
    TARFLOW_MODEL=path/or/hub-id python spaces_demo/app.py  # any TarFlow or STARFlow pipeline folder or Hub id

The app is the `tarflow_space` package next to this file; its settings (environment variables) are listed in
spaces_demo/README.md.
"""

import contextlib
import sys
from pathlib import Path

# ZeroGPU wants `spaces` imported before anything touches CUDA; elsewhere it is not installed.
with contextlib.suppress(ImportError):
    import spaces  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the package beside this file, however app.py is run

try:
    import tarflow_hf  # noqa: F401
except ImportError as import_error:  # pragma: no cover - a deployment mistake, not a code path
    raise SystemExit(
        "tarflow_hf is not importable: `pip install -e .` in the tarflow-hf repository, or copy its "
        "src/tarflow_hf folder next to app.py (see spaces_demo/README.md)"
    ) from import_error

from tarflow_space import build_demo, launch, main

__all__ = ["build_demo", "launch", "main"]

if __name__ == "__main__":
    main(sys.argv[1:])
