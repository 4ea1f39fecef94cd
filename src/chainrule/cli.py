"""The `chainrule` command line. `chainrule train` trains an MLP or CNN with chainrule's gradients.

Examples (shell)::

    chainrule train                          # the tutorial's 10 -> 5 -> 1 teacher, SGD
    chainrule train --data digits            # handwritten digits, Adam, ~97% test accuracy
    chainrule train --data digits --engine jax   # in runs/digits-jax (one folder per data, engine)
    chainrule train --data digits --model cnn   # a small CNN, in runs/digits-cnn-chainrule
    chainrule train --data my.csv --epochs 50 --hidden 64,64
    chainrule train --data digits --resume   # continue an interrupted run

Exit codes: 0 success; 1 the training loss became NaN or infinite; 2 a user
error (options, data, checkpoints, output folder), printed as one
`chainrule train: error: ...` line naming the fix; 130 Ctrl-C (after saving
what the run had done).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]

_DATA_HELP = """\
data:
  teacher   (default) the tutorial's regression: 10 features, one output made by a
            fixed 10 -> 5 -> 1 ReLU network; MLP 10-5-1, MSE, SGD lr 0.01, batch 32.
  digits    scikit-learn's 8x8 handwritten digits (needs scikit-learn); MLP
            64-128-10, cross-entropy, Adam lr 1e-3, batch 64, 30 epochs.
  FILE.csv  a header row, then one example per row, all numeric. A column named
            `label` (integer classes 0..K-1) makes it classification; otherwise
            the `target` / `target_*` columns are regression targets. All other
            columns are features.
  FILE.npz  arrays `x` (examples, features) and either `label` (examples,) of
            integers or `target` (examples,) or (examples, outputs).
  Files: 20% of the rows are held out for testing (--test-fraction), MLP with one
  hidden layer of 128, Adam lr 1e-3, batch 32, 20 epochs. NaN values are rejected.

model (--model):
  mlp       (default) the MLP above.
  cnn       square single-channel images (the features are the pixels, e.g. the
            8x8 digits): Conv(3x3, 16) ReLU Conv(3x3, 32) ReLU MaxPool(2) Linear;
            --hidden gives the two channel counts (16,32); Adam lr 3e-3.

output (in --out, default runs/<data>-<engine>, e.g. runs/digits-chainrule, or
  runs/digits-cnn-chainrule for --model cnn):
  ckpt-<step>.npz (the newest two), loss_curve.png, summary.json. One run at a
  time per folder (it is locked). A folder holding a run needs --resume (continue
  it) or --overwrite (delete it and start over); --resume on a folder with no
  checkpoint yet starts a new run. Ctrl-C stops after the current step, saves
  the checkpoint, loss curve and summary, and exits 130.
"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # raise instead of printing usage and exiting
        raise _UsageError(f"{message}. See `{self.prog} --help`.")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    from chainrule.train.config import SEED_MAX

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {SEED_MAX}, got {text!r}")
    return value


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of layer sizes (e.g. 128,64)"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"layer sizes must be positive integers, got {text!r}")
    return sizes


def _parser() -> _Parser:
    parser = _Parser(
        prog="chainrule",
        description="chainrule: reverse-mode autodiff you can read. Commands: train.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    p = commands.add_parser(
        "train",
        help="train an MLP with chainrule's (or JAX's) gradients",
        description="Train an MLP with a jit-compiled optax step whose gradients come from "
        "chainrule's own VJP rules (--engine chainrule) or from jax.value_and_grad "
        "(--engine jax). Prints a summary; writes checkpoints, a loss curve and summary.json.",
        epilog=_DATA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default=None, help="teacher (default), digits, or a .csv/.npz path")
    p.add_argument("--engine", default="chainrule", help="chainrule (default) or jax")
    p.add_argument("--optimizer", default=None, help="sgd or adam (default: per data set)")
    p.add_argument("--lr", type=float, default=None, help="learning rate > 0")
    p.add_argument("--batch-size", type=_positive_int, default=None)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=None, help="total training steps")
    length.add_argument("--epochs", type=_positive_int, default=None, help="total epochs")
    p.add_argument(
        "--model",
        default=None,
        help="mlp (default) or cnn: two 3x3 conv layers with ReLU, 2x2 max pooling and a linear "
        "head, for square single-channel images such as --data digits",
    )
    p.add_argument(
        "--hidden",
        type=_sizes,
        default=None,
        help="MLP hidden layer sizes, e.g. 128,64; for --model cnn the two conv layers' "
        "channels (default 16,32)",
    )
    p.add_argument("--seed", type=_seed, default=None, help="model init and batch order (0)")
    p.add_argument(
        "--devices",
        type=_positive_int,
        default=1,
        help="data parallel over this many devices (batch sharded, weights replicated)",
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/<data>-<engine>)")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --out (a new run if there is none)",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run already in --out (checkpoints, summary, loss curve) and start over",
    )
    p.add_argument(
        "--checkpoint-every", type=_positive_int, default=None, help="steps (10%% of the run)"
    )
    p.add_argument("--test-fraction", type=float, default=None, help="held-out share (0.2)")
    p.add_argument("--quiet", action="store_true", help="no progress output, summary only")
    p.add_argument(
        "--check-finite",
        action="store_true",
        help="stop at the first NaN/inf gradient with where it came from (chainrule engine)",
    )
    return parser


def _simulate_cpu_devices(n: int) -> None:
    """Lets `--devices N` work on a CPU-only machine, if JAX has not started its backends yet."""
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _error(message: str) -> None:
    print(f"chainrule train: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code (0 ok, 1 diverged, 2 user error, 130 ^C)."""
    try:
        args = _parser().parse_args(argv)
    except _UsageError as e:
        _error(str(e))
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    _simulate_cpu_devices(args.devices)
    try:
        return _train(args)
    except KeyboardInterrupt:  # before the run took charge of Ctrl-C (imports, options)
        print(
            "\nchainrule train: interrupted before training started; nothing saved.",
            file=sys.stderr,
        )
        return 130


def _train(args: argparse.Namespace) -> int:
    from chainrule.train import TrainError, TrainingDiverged, TrainingInterrupted
    from chainrule.train.loop import TrainConfig, run

    cfg = TrainConfig(
        data=args.data,
        engine=args.engine,
        optimizer=args.optimizer,
        lr=args.lr,
        batch_size=args.batch_size,
        steps=args.steps,
        epochs=args.epochs,
        hidden=args.hidden,
        model=args.model,
        seed=args.seed,
        devices=args.devices,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        checkpoint_every=args.checkpoint_every,
        test_fraction=args.test_fraction,
        quiet=args.quiet,
        check_finite=args.check_finite,
    )
    try:
        run(cfg)
    except TrainingInterrupted as e:
        print(f"\nchainrule train: {e}", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        _error(str(e))
        return 1
    except TrainError as e:  # options, data, checkpoints, the output folder
        _error(str(e))
        return 2
    return 0
