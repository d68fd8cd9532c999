"""Benchmarks of tarflow-hf, run as modules from the repository root so that they import each other and the installed
package without path edits:

    python -m benchmarks.sampling --ml-tarflow /path/to/ml-tarflow          # TarFlow against apple/ml-tarflow
    python -m benchmarks.sampling --family starflow --ml-starflow /path/to/ml-starflow
    python -m benchmarks.decode_anatomy
    python -m benchmarks.jacobi_anatomy
    python -m benchmarks.training --ml-tarflow /path/to/ml-tarflow
    python -m benchmarks.convert_starflow --deep-layers 4

Apple's code is never copied here: `--ml-tarflow` / `--ml-starflow` name a checkout that `benchmarks.apple_model`
loads at run time. The current figures, with the commands and the machine they ran on, are in docs/benchmarks.md.
"""
