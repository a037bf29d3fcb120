"""The training harness of lp_callbacks: a LightningModule, a DataModule, model loading and the ``lp-callbacks`` CLI.

A convenience around the library, not part of it: the callbacks work with any LightningModule holding a Hugging Face
causal LM, and nothing in ``lp_callbacks`` outside this subpackage imports it.

* :class:`CausalLMModule` (``harness/module.py``): language-modelling loss, AdamW, warmup + cosine schedule; the
  model from a :class:`ModelSpec` (SmolLM2, a Hub name, a directory, a GGUF file, a random config) or an object.
* :class:`TextDataModule` (``harness/data.py``): text files, a Hub dataset or Shakespeare, tokenised, packed into
  blocks, cached on disk.
* ``harness/models.py``: :func:`load_causal_lm`, :func:`load_smollm2` (with a local cache), :func:`byte_tokenizer`.
* :class:`ProgressLog` (``harness/progress.py``): progress lines for runs logged to a file.
* ``harness/cli.py``: the ``lp-callbacks`` command (a LightningCLI; imported on its own, not from here).

Example:
    >>> from lp_callbacks.harness import CausalLMModule, ModelSpec, TextDataModule  # doctest: +SKIP
    >>> module = CausalLMModule(ModelSpec(smollm2=True), lr=1e-4)  # doctest: +SKIP
    >>> data = TextDataModule(shakespeare=True, tokenizer=module.tokenizer, block_size=256)  # doctest: +SKIP
"""

from lp_callbacks.harness.data import SplitLoader, TextDataModule, shakespeare_files
from lp_callbacks.harness.models import ModelSpec, byte_tokenizer, load_causal_lm, load_smollm2, load_tokenizer
from lp_callbacks.harness.module import CausalLMModule
from lp_callbacks.harness.progress import ProgressLog

__all__ = [
    "CausalLMModule",
    "ModelSpec",
    "ProgressLog",
    "SplitLoader",
    "TextDataModule",
    "byte_tokenizer",
    "load_causal_lm",
    "load_smollm2",
    "load_tokenizer",
    "shakespeare_files",
]
