"""How long the Space (spaces_demo/) takes to answer a 4-image "Generate" request, on this machine.

    python -m benchmarks.demo_latency                          # the bundled MNIST model
    python -m benchmarks.demo_latency --model path/or/hub-id   # any TarFlow pipeline
    python -m benchmarks.demo_latency --through-server         # also end to end: HTTP on loopback, PNGs, queue

The first measurement is the work behind the button: the Space's own `generate_images` (prior noise, the flow
inverted block by block with the trajectory recorded through `callback_on_step_end`, denoising, PIL images), after
one warm-up request. With `--through-server` the Space is also served on 127.0.0.1 and called through
`gradio_client`, which adds the queue, PNG encoding and the transfer of the files. Prints the median over
`--repeats` requests, in seconds.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch

from tarflow_hf.guidance import GuidanceRule
from tarflow_hf.samplers import SAMPLERS, get_sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spaces_demo"))  # the Space's package, beside app.py

from tarflow_space import build_demo, launch, page_generate
from tarflow_space.models import ModelStore, ServingOptions, class_options, operator_model
from tarflow_space.sampling import SamplingRequest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled", help="pipeline folder or Hub id (default: the bundled model)")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: sequential sampling runs many small ops, and on a busy machine a second "
        "thread waiting for a core can make a request 50x slower)",
    )
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default="sequential")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="default 1.0 (none), the page's default")
    parser.add_argument("--through-server", action="store_true", help="also time requests over HTTP on loopback")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--num-images, --repeats and --threads must be >= 1")
    return args


def time_direct(pipe, args: argparse.Namespace, class_id: int | None) -> list[float]:
    rule = GuidanceRule(pipe.transformer.config.default_guidance_rule)

    def request(seed: int, count: int) -> float:
        sampling = SamplingRequest(count, args.guidance_scale, seed, get_sampler(args.sampler), rule)
        start = time.perf_counter()
        page_generate.generate_images(pipe, class_id, sampling)
        return time.perf_counter() - start

    request(10_000, 1)  # warm-up: first-call allocations and lazy imports
    return [request(seed, args.num_images) for seed in range(args.repeats)]


def time_server(args: argparse.Namespace, class_name: str | None) -> list[float]:
    from gradio_client import Client

    demo = build_demo(args.model)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False)

        def request(seed: int, count: int) -> float:
            start = time.perf_counter()
            client.predict(class_name=class_name, num_images=count, guidance_scale=args.guidance_scale, seed=seed,
                           sampler=args.sampler, api_name="/generate")  # fmt: skip
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
    try:
        model = operator_model(args.model)
    except (OSError, ValueError) as error:
        print(f"--model: {error}", file=sys.stderr)
        return 2
    pipe = ModelStore(model, ServingOptions.from_env()).load(model)
    config = pipe.transformer.config
    class_id = 0 if config.num_classes else None
    print(
        f"model {model.name}: {config.image_size}x{config.image_size}x{config.num_channels}, {config.num_blocks} "
        f"blocks x {config.layers_per_block} layers, width {config.hidden_size}; {pipe.device.type}, "
        f"{args.threads} thread(s), {args.sampler} sampler, guidance {args.guidance_scale:g}, denoised"
    )
    report("generate_images (the button's work)", time_direct(pipe, args, class_id), args.num_images)
    if args.through_server:
        class_name = class_options(pipe)[0] if class_id is not None else None
        report("through the server (HTTP, queue, PNGs)", time_server(args, class_name), args.num_images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
