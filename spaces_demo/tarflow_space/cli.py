"""`python app.py [MODEL] [--host H] [--port P] [--allow-model-change] [--model-root DIR]`: serve the Space."""

from __future__ import annotations

import argparse
import logging

from .demo import build_demo, launch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the TarFlow / STARFlow demo (settings: spaces_demo/README.md).")
    parser.add_argument("model", nargs="?", help="pipeline folder or Hub id (default: $TARFLOW_MODEL, then bundled)")
    parser.add_argument(
        "--allow-model-change",
        action="store_true",
        default=None,
        help="let visitors load Hub ids and folders under --model-root (default: $TARFLOW_ALLOW_MODEL_CHANGE, off)",
    )
    parser.add_argument(
        "--model-root", help="folder of pipeline folders visitors may load (default: $TARFLOW_MODEL_ROOT)"
    )
    parser.add_argument("--host", default=None, help="address to listen on (default: Gradio's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860)")
    return parser.parse_args(argv)


def configure_logging() -> None:
    """One line per event: the demo's INFO messages, no progress bars from loading, no per-request HTTP lines."""
    import diffusers.utils.logging
    import transformers.utils.logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging()
    demo = build_demo(args.model, allow_model_change=args.allow_model_change, model_root=args.model_root)
    launch(demo, server_name=args.host, server_port=args.port)
