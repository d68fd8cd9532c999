"""The TarFlow / STARFlow Space as a package, one job per module:

- `limits`: what a request may ask for (bounds, compute budget) and the operator's settings;
- `models`: which models may be loaded (operator, visitors), loading them, keeping them;
- `images`: uploads and drawings fitted to a model, outputs shown;
- `sampling`: the samplers and their options, sampling requests, the trajectory; `timing`: what requests take;
- `events`: buttons to model calls (checks first, readable and lasting messages); `components`: shared page pieces;
- `gpu`: ZeroGPU (`spaces.GPU`) when available; `space`: what the pages of one demo share;
- one module per tab: `page_generate`, `page_likelihood`, `page_interpolation` (TarFlow), `page_text_to_image`,
  `page_captions` (STARFlow), with `generation` for what both Generate tabs share;
- `demo`: the Space assembled (`build_demo`, `launch`); `cli`: the command line (`main`).
"""

import os

# Before Gradio is imported: the demo sends no usage statistics unless the operator asks for them.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from .cli import main
from .demo import build_demo, launch

__all__ = ["build_demo", "launch", "main"]
