"""Command line of the trainer job: `python -m trainer {fetch,train,evaluate}`."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from model_artifact import ArtifactError, find_valid_version, read_metadata, resolve_version_dir
from trainer.config import TrainConfig
from trainer.data import DATA_DIR_ENV, DataError, fetch_mnist, load_mnist

log = logging.getLogger("trainer")
_DEFAULTS = TrainConfig()
DRY_RUN_OUTPUT_DIR = Path("dry-run-artifacts")  # smoke runs never land beside real models by default


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"MNIST cache directory (default: ${DATA_DIR_ENV}, else ~/.cache/digit-service/mnist)",
    )


def _cuda_available() -> bool:
    import torch  # imported here: `fetch` and --help stay fast

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description=(
            "Train a CNN on MNIST and publish it as a versioned TorchScript artifact "
            "(artifacts/<name>/<version>/model.pt + metadata.json), then evaluate it. "
            "The data set is fetched and verified by SHA-256 on first use."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = commands.add_parser("fetch", help="download and verify the four MNIST files into the cache")
    _add_common(fetch)

    train = commands.add_parser("train", help="train, evaluate and export a new artifact version")
    _add_common(train)
    train.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"artifact root (default: {_DEFAULTS.output_dir}; {DRY_RUN_OUTPUT_DIR} with --dry-run)",
    )
    train.add_argument("--model-name", default=_DEFAULTS.model_name, help="artifact name (default: %(default)s)")
    train.add_argument(
        "--members",
        type=_positive_int,
        default=_DEFAULTS.members,
        help="networks in the ensemble (default: %(default)s)",
    )
    train.add_argument(
        "--epochs", type=_positive_int, default=_DEFAULTS.epochs, help="epochs per network (default: %(default)s)"
    )
    train.add_argument(
        "--amp", choices=["auto", "off"], default=_DEFAULTS.amp, help="bf16 autocast where fast (default: %(default)s)"
    )
    train.add_argument("--batch-size", type=_positive_int, default=_DEFAULTS.batch_size, help="(default: %(default)s)")
    train.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="peak learning rate (default: %(default)s)")
    train.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="random seed (default: %(default)s)")
    train.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default=_DEFAULTS.device, help="(default: %(default)s)"
    )
    train.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="distil from this artifact version directory, e.g. artifacts/mnist-cnn/1 (default: labels only)",
    )
    train.add_argument(
        "--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    train.add_argument("--dry-run", action="store_true", help="tiny subset and one epoch: a smoke test in seconds")
    train.add_argument("--no-report", action="store_true", help="skip writing the report next to the artifact")
    train.add_argument(
        "--skip-existing",
        action="store_true",
        help="exit at once if a valid artifact (metadata and checksum verified, not a smoke test) exists",
    )
    train.add_argument(
        "--allow-smoke",
        action="store_true",
        help="let --skip-existing accept a --dry-run artifact (default: only trained models count)",
    )

    evaluate = commands.add_parser(
        "evaluate", help="verify and load an artifact, measure it on the test set, write a report apart from it"
    )
    _add_common(evaluate)
    evaluate.add_argument(
        "--output-dir", type=Path, default=_DEFAULTS.output_dir, help="artifact root (default: %(default)s)"
    )
    evaluate.add_argument("--model-name", default=_DEFAULTS.model_name, help="artifact name (default: %(default)s)")
    evaluate.add_argument("--version", type=int, default=None, help="artifact version (default: newest)")
    evaluate.add_argument("--path", type=Path, default=None, help="a version directory, instead of name/version")
    evaluate.add_argument(
        "--report-dir",
        type=Path,
        default=Path("reports"),
        help="where the report goes, as <dir>/<name>/<version>/; a published version is never rewritten "
        "(default: %(default)s)",
    )
    convert = commands.add_parser(
        "convert",
        help="publish a trained version in a cheaper precision as a new version, if it keeps its validation accuracy",
    )
    _add_common(convert)
    convert.add_argument("source", type=Path, help="a float32 version directory, e.g. artifacts/mnist-cnn/1")
    convert.add_argument("--precision", choices=["bfloat16"], default="bfloat16", help="(default: %(default)s)")
    convert.add_argument(
        "--output-dir", type=Path, default=_DEFAULTS.output_dir, help="artifact root (default: %(default)s)"
    )
    convert.add_argument(
        "--max-extra-val-errors",
        type=int,
        default=1,
        help="validation mistakes it may add to float32's, or nothing is published (default: %(default)s)",
    )
    convert.add_argument("--no-report", action="store_true", help="skip writing the report next to the artifact")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "fetch":
            log.info("MNIST verified in %s", fetch_mnist(args.data_dir))
        elif args.command == "train":
            output_dir = args.output_dir or (DRY_RUN_OUTPUT_DIR if args.dry_run else _DEFAULTS.output_dir)
            if args.device == "cuda" and not _cuda_available():
                log.error("--device cuda was asked for, but no CUDA device is available (use --device cpu or auto)")
                return 2
            if args.teacher is not None:
                read_metadata(args.teacher)  # a wrong teacher path fails now, not after loading MNIST
            if args.skip_existing and (
                existing := find_valid_version(output_dir, args.model_name, allow_smoke=args.allow_smoke)
            ):
                log.info("a valid artifact exists at %s; not training (drop --skip-existing to retrain)", existing)
                print(existing)
                return 0
            from trainer.train import train_and_export

            cfg = TrainConfig(
                model_name=args.model_name,
                output_dir=output_dir,
                data_dir=args.data_dir,
                seed=args.seed,
                device=args.device,
                threads=args.threads,
                members=args.members,
                epochs=args.epochs,
                amp=args.amp,
                batch_size=args.batch_size,
                lr=args.lr,
                dry_run=args.dry_run,
                teacher=args.teacher,
            )
            mnist = load_mnist(args.data_dir)
            command = shlex.join(["python", "-m", "trainer", *(sys.argv[1:] if argv is None else argv)])
            version_dir = train_and_export(cfg, mnist, command, report=not args.no_report)
            print(version_dir)
        elif args.command == "evaluate":
            from trainer.evaluate import write_report

            version_dir = args.path or resolve_version_dir(args.output_dir, args.model_name, args.version)
            report_dir = args.report_dir / version_dir.parent.name / version_dir.name
            scores = write_report(version_dir, load_mnist(args.data_dir).test, report_dir)
            print(f"{version_dir}: test accuracy {100 * scores.accuracy:.2f} %; report in {report_dir}")
        elif args.command == "convert":
            from trainer.convert import convert_precision

            read_metadata(args.source)  # a wrong path fails now, not after loading MNIST
            command = shlex.join(["python", "-m", "trainer", *(sys.argv[1:] if argv is None else argv)])
            version_dir = convert_precision(
                args.source,
                args.precision,
                args.output_dir,
                load_mnist(args.data_dir),
                command,
                max_extra_val_errors=args.max_extra_val_errors,
                report=not args.no_report,
            )
            print(version_dir)
    except (DataError, ArtifactError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
