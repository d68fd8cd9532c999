"""Convert an Apple checkpoint (apple/ml-tarflow or apple/ml-starflow) to a pipeline folder, or back: the same as
`tarflow-hf convert`.

    python conversion/convert_ml_tarflow.py afhq_model_8_768_8_8_0.07.pth tarflow-afhq-256
    python conversion/convert_ml_tarflow.py CHECKPOINT.pth OUTPUT_DIR [--noise-std S] [--in-channels C]
        [--labels afhq|imagenet|none|FILE.json] [--overwrite]
    python conversion/convert_ml_tarflow.py STARFLOW.pth OUTPUT_DIR [--config FILE.yaml] [--license-file FILE]
        [--transformer-only | --text-encoder ID_OR_PATH --vae ID_OR_PATH] [--overwrite]
    python conversion/convert_ml_tarflow.py --reverse FOLDER OUT.pth [--overwrite]

`--overwrite` replaces an earlier conversion only: never a folder holding the input or files a conversion does not
write, never a file that is not a PyTorch checkpoint. All the logic lives in `tarflow_hf.convert` (ml-tarflow),
`tarflow_hf.convert_starflow` (ml-starflow) and `tarflow_hf.apple_checkpoints` (what both share); see their
documentation.
"""

import sys

from tarflow_hf.commands import run_command

if __name__ == "__main__":
    sys.exit(run_command("convert", prog="convert_ml_tarflow.py"))
