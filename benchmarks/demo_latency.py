"""How long the demo (spaces_demo/app.py) takes to answer a 4-image "Generate" request, on this machine.

    python benchmarks/demo_latency.py                          # the bundled MNIST model
    python benchmarks/demo_latency.py --model path/or/hub-id   # any TarFlow pipeline
    python benchmarks/demo_latency.py --through-server         # also end to end: HTTP on loopback, PNGs, queue

The first measurement is the work behind the button: the same `generate_images` call the app makes (prior noise,
the flow inverted block by block with the trajectory recorded, denoising, PIL images), after one warm-up request.
With `--through-server` the app is also served on 127.0.0.1 and called through `gradio_client`, which adds the
queue, PNG encoding and the transfer of the files. Prints the median over `--repeats` requests, in seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch

APP_PATH = Path(__file__).resolve().parents[1] / "spaces_demo" / "app.py"


def load_app():
    spec = importlib.util.spec_from_file_location("tarflow_spaces_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="pipeline folder or Hub id (default: the bundled MNIST model)")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: sequential sampling runs many small ops, and on a busy machine a second "
        "thread waiting for a core can make a request 50x slower)",
    )
    parser.add_argument("--sampler", choices=("sequential", "jacobi", "newton"), default="sequential")
    parser.add_argument("--guidance-scale", type=float, help="default: the model's default_guidance_scale")
    parser.add_argument("--through-server", action="store_true", help="also time requests over HTTP on loopback")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--num-images, --repeats and --threads must be >= 1")
    return args


def time_direct(app, pipe, args, class_id: int | None, guidance: float) -> list[float]:
    def request(seed: int, count: int) -> float:
        start = time.perf_counter()
        app.generate_images(pipe, class_id, count, guidance, seed, sampler=args.sampler)
        return time.perf_counter() - start

    request(10_000, 1)  # warm-up: first-call allocations and lazy imports
    return [request(seed, args.num_images) for seed in range(args.repeats)]


def time_server(app, model: str, args, class_choice: str | None, guidance: float) -> list[float]:
    from gradio_client import Client

    demo = app.build_demo(model)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False)

        def request(seed: int, count: int) -> float:
            start = time.perf_counter()
            client.predict(class_choice, count, guidance, seed, "both", "constant", 1.0, True, 1.0, args.sampler,
                           api_name="/generate")  # fmt: skip
            return time.perf_counter() - start

        request(10_000, 1)
        return [request(seed, args.num_images) for seed in range(args.repeats)]
    finally:
        demo.close()


def report(label: str, times: list[float], count: int) -> None:
    median = statistics.median(times)
    runs = ", ".join(f"{t:.2f}" for t in times)
    print(f"{label}: {count} images in {median:.2f} s (median of {len(times)}: {runs}; {median / count:.2f} s/image)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    app = load_app()
    import tarflow_hf

    model = args.model or tarflow_hf.BUNDLED_MODEL
    if not args.model and not Path(model).is_dir():
        print(f"the bundled model is not there yet ({model}): pass --model PATH", file=sys.stderr)
        return 2
    pipe = app.load_pipeline(model)
    config = pipe.transformer.config
    class_id = 0 if config.num_classes else None
    guidance = config.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
    print(
        f"model {model}: {config.image_size}x{config.image_size}x{config.num_channels}, {config.num_blocks} blocks x "
        f"{config.layers_per_block} layers, width {config.hidden_size}; {pipe.device.type}, {args.threads} thread(s), "
        f"{args.sampler} sampler, guidance {guidance:g}, denoised"
    )
    report("generate_images (the button's work)", time_direct(app, pipe, args, class_id, guidance), args.num_images)
    if args.through_server:
        choice = app.class_choices(pipe)[0] if class_id is not None else None
        report(
            "through the server (HTTP, queue, PNGs)", time_server(app, model, args, choice, guidance), args.num_images
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
