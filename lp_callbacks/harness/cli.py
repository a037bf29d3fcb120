"""``lp-callbacks``: train, validate, test or measure a Hugging Face causal LM from a YAML config (a LightningCLI).

Subcommands: ``fit``, ``validate``, ``test``, ``predict`` (as Lightning gives them) and ``measure`` (the Block
Influence profile of the model on a calibration split, no training; printed and saved as ``bi_profile.json``,
``bi_profile.csv`` and ``bi_profile.png``).

Configs are Lightning's own (jsonargparse, in omegaconf mode: ``${...}`` interpolations work)::

    model:
      class_path: lp_callbacks.harness.CausalLMModule
      init_args: {model: {smollm2: true}, lr: 1.0e-4}
    data:
      class_path: lp_callbacks.harness.TextDataModule
      init_args: {shakespeare: true, block_size: 256}
    trainer:
      max_steps: 100
      callbacks:
        - class_path: lp_callbacks.LayerPruneCallback
          init_args: {num_layers: 6, at_steps: [15, 30, 45]}

Links: the model's tokenizer (``CausalLMModule.tokenizer``) goes to ``data.init_args.tokenizer`` and to the
``tokenizer`` of every callback that takes one (the pruner exports it with the model); the data module's
``calibration_dataloader()`` (the blocks of its ``calibration_split``, or ``None``) goes to the
``calibration_dataloader`` of every callback that takes one.

When stdout is not a terminal (a log file), the progress bar gives way to :class:`ProgressLog`: one line every
``trainer.log_every_n_steps`` steps with the step, the loss and the ETA, and the validation loss when computed.

Example:
    $ lp-callbacks fit --config configs/main_job.yaml
    $ lp-callbacks fit -c configs/tiny.yaml --data.init_args.data_files=notes.txt --trainer.max_steps=20
    $ lp-callbacks fit -c configs/main_job.yaml --ckpt_path=last          # resume an interrupted run
    $ lp-callbacks measure -c configs/measure.yaml --max_batches=4
    $ lp-callbacks fit -c configs/tiny.yaml --print_config                # the full config, runnable as is
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lp_callbacks.harness.data import TextDataModule
from lp_callbacks.harness.module import CausalLMModule
from lp_callbacks.harness.progress import ProgressLog

__all__ = ["ArgumentParser", "ConfigError", "HarnessTrainer", "LPCallbacksCLI", "main"]

PROG = "lp-callbacks"
DESCRIPTION = "Train, validate, test or measure a Hugging Face causal LM with lp_callbacks, from YAML configs."


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the class (or key) and what was wrong."""


class HarnessTrainer(pl.Trainer):
    """Lightning's :class:`~lightning.pytorch.Trainer` plus :meth:`measure` (the ``lp-callbacks measure`` command)."""

    def measure(
        self,
        model: pl.LightningModule,
        datamodule: TextDataModule,
        split: Literal["val", "train"] = "val",
        max_batches: int | None = 8,
        block_sizes: Sequence[int] = (1,),
        max_tokens_per_batch: int | None = None,
        output_dir: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """Block Influence profile of the model's decoder blocks on a calibration split, without training.

        Writes ``bi_profile.json``, ``bi_profile.csv`` and ``bi_profile.png`` to ``output_dir`` and prints the
        table; the model runs on the Trainer's device.

        Args:
            model: the LightningModule holding the Hugging Face model.
            datamodule: a :class:`~lp_callbacks.harness.data.TextDataModule`, whose blocks are measured.
            split: which blocks to measure on: the held-out ``val`` blocks or the ``train`` blocks.
            max_batches: at most this many batches (``null``: all).
            block_sizes: also report Gromov's angular distance over runs of these many contiguous blocks.
            max_tokens_per_batch: token budget per batch (evenly spaced real tokens); ``null``: all.
            output_dir: where the three files go; default ``<trainer.default_root_dir>/measure``.

        Returns:
            The profile written to ``bi_profile.json``.
        """
        from lp_callbacks import measure_depth
        from lp_callbacks.harness.data import SplitLoader
        from lp_callbacks.plotting import plot_bi_profile

        if split == "val" and datamodule.val_fraction == 0:
            raise ConfigError("split: `val` needs held-out blocks but data.init_args.val_fraction=0; use --split=train.")
        model.to(self.strategy.root_device)
        result = measure_depth(model, SplitLoader(datamodule, split), max_batches=max_batches,
                               block_sizes=list(block_sizes), max_tokens_per_batch=max_tokens_per_batch)
        bi = result.block_influence.tolist()
        angular = {n: d.tolist() for n, d in sorted(result.angular_distances.items())}
        ranking = sorted(range(len(bi)), key=lambda i: bi[i])
        out = Path(output_dir if output_dir is not None else Path(self.default_root_dir) / "measure")
        out.mkdir(parents=True, exist_ok=True)
        spec = getattr(model, "model_spec", None)
        profile = {"model": spec.describe() if spec is not None else type(model).__name__, "split": split,
                   "tokens": result.tokens, "skipped_tokens": result.skipped_tokens, "num_layers": len(bi),
                   "block_influence": bi, "angular_distances": {str(n): d for n, d in angular.items()},
                   "lowest_bi_first": ranking}
        (out / "bi_profile.json").write_text(json.dumps(profile, indent=2))
        with open(out / "bi_profile.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["layer", "block_influence", "bi_rank"] + [f"angular_distance_n{n}" for n in angular])
            for i, value in enumerate(bi):
                # angular[n][i]: the run of n blocks starting at block i (absent for the last n - 1 blocks)
                writer.writerow([i, value, ranking.index(i)] + [d[i] if i < len(d) else "" for d in angular.values()])
        plot_bi_profile(bi, list(range(len(bi))), path=out / "bi_profile.png")
        print(_format_profile(profile, angular), flush=True)
        print(f"  written to {out.resolve()} (bi_profile.json, bi_profile.csv, bi_profile.png)", flush=True)
        return profile


class ArgumentParser(LightningArgumentParser):
    """Lightning's parser, whose errors are the message and a pointer to ``--help``, without the long usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # an inner parser: the outer one reports
            super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {message.rstrip()}\n(`{prog} --help` lists the keys)\n")
        sys.exit(2)


def _tokenizer_of(module: Any) -> Any:
    return getattr(module, "tokenizer", None)


def _calibration_of(datamodule: Any) -> Any:
    return datamodule.calibration_dataloader()


class LPCallbacksCLI(LightningCLI):
    """The ``lp-callbacks`` command line: :class:`~lightning.pytorch.cli.LightningCLI` over
    :class:`~lp_callbacks.harness.module.CausalLMModule` and :class:`~lp_callbacks.harness.data.TextDataModule`
    (or subclasses), with a ``measure`` subcommand, the tokenizer and calibration links, a plain-line progress log
    off a terminal, and a summary of the run after ``fit``."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf", "prog": PROG, "description": DESCRIPTION})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            CausalLMModule, TextDataModule, trainer_class=HarnessTrainer, parser_class=ArgumentParser,
            subclass_mode_model=True, subclass_mode_data=True, seed_everything_default=0,
            auto_configure_optimizers=False, args=args, run=run, **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "measure": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model", "data.init_args.tokenizer", compute_fn=_tokenizer_of, apply_on="instantiate")
        parser.link_arguments("model", "trainer.callbacks.init_args.tokenizer", compute_fn=_tokenizer_of,
                              apply_on="instantiate")
        parser.link_arguments("data", "trainer.callbacks.init_args.calibration_dataloader",
                              compute_fn=_calibration_of, apply_on="instantiate")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError) as err:
            cause = _constructor_error(err)
            message = " ".join(str(cause).split())
            if "`calibration_dataloader`" in message:
                message += " With lp-callbacks, set `data.init_args.calibration_split: val` (or `train`)."
            raise ConfigError(f"{_raised_in(cause)}{message}") from err

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self.config_init.get(str(self.subcommand), self.config_init).get("trainer", {})
        callbacks = list(config.get("callbacks") or [])
        off_terminal = not sys.stdout.isatty()
        if off_terminal and config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            kwargs["callbacks"] = [*callbacks, ProgressLog()]
        return super().instantiate_trainer(**kwargs)

    # ------------------------------------------------------------------------------------ subcommand hooks

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        report = fit_report(self.trainer, time.perf_counter() - self._fit_started)
        if self.trainer.is_global_zero:
            print(format_fit_report(report), flush=True)

    def before_validate(self) -> None:
        if self.datamodule.val_fraction == 0:
            raise ConfigError("data.init_args.val_fraction: `validate` needs held-out blocks, got 0.")


def _constructor_error(err: BaseException) -> BaseException:
    """The error a constructor raised, past the errors jsonargparse raises around it (a union of subclasses)."""
    while True:
        inner = err.__cause__ or err.__context__
        frames = traceback.extract_tb(err.__traceback__)
        if inner is None or not frames or "jsonargparse" not in Path(frames[-1].filename).parts:
            return err
        err = inner


def _raised_in(err: BaseException) -> str:
    """``"<Class>: "`` of the outermost constructor in the traceback of ``err`` (``""`` when there is none)."""
    for frame, _ in traceback.walk_tb(err.__traceback__):
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name in ("__init__", "__post_init__") and owner is not None:
            return f"{type(owner).__name__}: "
    return ""


# ============================================================================================ reports


def fit_report(trainer: pl.Trainer, elapsed: float) -> dict[str, Any]:
    """What a ``fit`` did: steps, time, depth, metrics, removed/frozen blocks, where the outputs are."""
    from lp_callbacks import DepthEfficiencyMonitor, LayerFreezeCallback, LayerPruneCallback
    from lp_callbacks.architectures import find_hf_model, get_decoder_layers

    hf = find_hf_model(trainer.lightning_module)
    report: dict[str, Any] = {
        "steps": trainer.global_step,
        "seconds": elapsed,
        "num_layers": len(get_decoder_layers(hf)),
        "log_dir": trainer.log_dir,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        "checkpoints": sorted({c.last_model_path or c.best_model_path for c in trainer.checkpoint_callbacks
                               if c.last_model_path or c.best_model_path}),
    }
    for cb in trainer.callbacks:
        if isinstance(cb, DepthEfficiencyMonitor) and cb.run_summary is not None:
            report["plots"] = sorted(v for v in cb.run_summary["files"].values())
            report["original_num_layers"] = cb.run_summary["original_num_layers"]
        if isinstance(cb, LayerPruneCallback):
            report["removed"] = [e["original_layers"] for e in cb.removed]
            if cb.export_dir is not None and cb.export_when in ("fit_end", "both") and Path(cb.export_dir).is_dir():
                report["exported_model"] = str(Path(cb.export_dir).resolve())
        if isinstance(cb, LayerFreezeCallback) and cb.record:
            report["frozen_blocks"] = cb.record.get("frozen_blocks")
    return report


def format_fit_report(report: dict[str, Any]) -> str:
    """The report of :func:`fit_report` as the lines ``lp-callbacks fit`` prints at the end."""
    lines = [f"{PROG} fit: {report['steps']} optimizer steps in {report['seconds']:.0f} s;"
             f" {report['num_layers']} decoder blocks at the end"
             + (f" (of {report['original_num_layers']})" if report.get("original_num_layers") else "")]
    for key in ("train_loss", "val_loss", "val_ppl"):
        if key in report["metrics"]:
            lines.append(f"  {key:<15}{report['metrics'][key]:.4f}")
    if report.get("removed"):
        lines.append(f"  removed blocks (original numbering, per event): {report['removed']}")
    if report.get("frozen_blocks") is not None:
        lines.append(f"  frozen blocks: {report['frozen_blocks']}")
    if report.get("log_dir"):
        lines.append(f"  logs:          {report['log_dir']}")
    for path in report.get("plots", []):
        lines.append(f"  output:        {path}")
    for path in report.get("checkpoints", []):
        lines.append(f"  checkpoint:    {path}  (resume: --ckpt_path={path})")
    if report.get("exported_model"):
        lines.append(f"  pruned model:  {report['exported_model']}"
                     "  (AutoModelForCausalLM.from_pretrained(path) loads it)")
    return "\n".join(lines)


def _format_profile(profile: dict[str, Any], angular: dict[int, list[float]]) -> str:
    bi, ranking = profile["block_influence"], profile["lowest_bi_first"]
    header = f"  {'block':>5}  {'BI':>9}  {'rank':>4}" + "".join(f"  {f'angular n={n}':>12}" for n in angular)
    title = (f"Block Influence of {profile['model']}: {profile['num_layers']} blocks, {profile['tokens']:,} tokens"
             f" of the {profile['split']} split (rank 0 = lowest BI = most redundant)")
    lines = [title, header]
    for i, value in enumerate(bi):
        row = f"  {i:>5}  {value:>9.5f}  {ranking.index(i):>4}"
        row += "".join(f"  {d[i]:>12.5f}" if i < len(d) else f"  {'':>12}" for d in angular.values())
        lines.append(row)
    return "\n".join(lines)


# ================================================================================================ main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lp-callbacks``; returns the exit status (2 for a configuration error).

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args if not a.startswith("-")), "")
    try:
        with warnings.catch_warnings():
            # `args` given from Python while sys.argv holds the caller's own arguments (pytest): intended here.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            LPCallbacksCLI(args=args)
    except SystemExit as exit_:  # --help, --print_config, or a parse error (already printed by jsonargparse)
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except ConfigError as err:
        print(f"{PROG} {command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
