"""Raw TorchScript throughput of model artifacts, measured side by side in one process.

    python scripts/model_speed.py artifacts/mnist-cnn/1 artifacts/mnist-cnn/2 [--batch 64] [--rounds 7]

Rounds alternate between the models, so a busy neighbour on a shared machine slows all of
them alike; the median round is reported, with images/s relative to the first model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_artifact import load_model  # noqa: E402


@torch.inference_mode()
def images_per_second(model: torch.nn.Module, batch: torch.Tensor, seconds: float) -> float:
    """Forward passes for about `seconds`; returns images per second."""
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        model(batch)
        done += batch.shape[0]
    return done / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", type=Path, nargs="+", help="artifact version directories; the first is the base")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=2.0, help="per model and round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    batch = torch.rand(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    models = [(path, *load_model(path)) for path in args.versions]
    for _, model, _ in models:  # warm-up: TorchScript profiles and optimises on the first calls
        images_per_second(model, batch, 1.0)
    rates: dict[Path, list[float]] = {path: [] for path, _, _ in models}
    for _ in range(args.rounds):
        for path, model, _ in models:
            rates[path].append(images_per_second(model, batch, args.seconds))

    base = statistics.median(rates[args.versions[0]])
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.rounds} rounds")  # noqa: T201
    for path, _, metadata in models:
        median = statistics.median(rates[path])
        print(  # noqa: T201
            f"{path!s:32} {metadata.precision:9} {median:9.0f} images/s "
            f"(min {min(rates[path]):.0f}, max {max(rates[path]):.0f})  x{median / base:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
