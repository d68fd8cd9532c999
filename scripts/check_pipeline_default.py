"""Class-consistency accuracy of the pipeline's *default call* (`pipe(class_labels=...)`, every other argument
left at its default, so guidance comes from `config.default_guidance_scale`), judged by the independent
classifier. Prints one JSON line.

    python scripts/check_pipeline_default.py MODEL_DIR CLASSIFIER_DIR [--per-class 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tarflow_hf.classifier import load_classifier
from tarflow_hf.fileio import write_json_atomic
from tarflow_hf.pipeline_tarflow import TarFlowPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("classifier")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set-default-guidance", type=float, default=None, help="store this in the config first")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()

    start = time.time()
    pipe = TarFlowPipeline.from_pretrained(args.model)
    if args.set_default_guidance is not None:
        pipe.transformer.config.default_guidance_scale = args.set_default_guidance
    classifier = load_classifier(args.classifier)
    num_classes = pipe.transformer.config.num_classes
    labels = torch.arange(num_classes).repeat_interleave(args.per_class)
    generator = torch.Generator().manual_seed(args.seed)
    correct = 0
    for begin in range(0, len(labels), args.batch_size):
        chunk = labels[begin : begin + args.batch_size]
        images = pipe(class_labels=chunk.tolist(), generator=generator, output_type="pt").images  # [0, 1]
        predictions = classifier.predict(images.float() * 2 - 1)
        correct += (predictions == chunk).sum().item()
    result = {
        "model": args.model,
        "default_guidance_scale": pipe.transformer.config.default_guidance_scale,
        "samples": len(labels),
        "pipeline_default_call_accuracy": correct / len(labels),
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(result))
    if args.output:
        write_json_atomic(args.output, result)


if __name__ == "__main__":
    main()
