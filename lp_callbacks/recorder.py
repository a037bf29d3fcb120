"""Forward hooks that feed the decoder blocks' inputs and outputs into the metrics, as the model runs.

One recorder per model: :class:`~lp_callbacks.callbacks.BlockInfluenceMonitor` owns one, and other callbacks read
the monitor instead of hooking the model again.

Why hooks and not ``output_hidden_states``: the hooks see each block's true input and output (HF applies the
final norm to the last hidden state), keep no list of L+1 states alive, and work on any forward: the training
step itself, so measuring costs no extra pass.

Example:
    >>> recorder = BlockInfluenceRecorder(model)      # doctest: +SKIP
    >>> with recorder.recording(), torch.no_grad():   # doctest: +SKIP
    ...     model(**batch)
    >>> recorder.bi_metric.compute()                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lp_callbacks.architectures import DecoderStack, decoder_stack
from lp_callbacks.metrics import AngularDistance, BlockInfluence

__all__ = ["BlockInfluenceRecorder"]


def _hidden_from_args(args: tuple, kwargs: dict[str, Any]) -> Tensor | None:
    if args and isinstance(args[0], Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, Tensor) else None


def _hidden_from_output(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    for name in ("hidden_states", "last_hidden_state"):  # a ModelOutput-like object (never `or`: a Tensor has no bool)
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    return None


def _mask_from(args: tuple, kwargs: dict[str, Any]) -> Any:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
        mask = args[1]  # HF convention: forward(input_ids, attention_mask, ...)
    return mask


class BlockInfluenceRecorder:
    """Hooks the decoder blocks of ``model`` and accumulates BI (and angular distances) while :attr:`enabled`.

    Args:
        model: an HF model or any module holding one, or its resolved
            :class:`~lp_callbacks.architectures.DecoderStack`.
        layers_path: explicit dotted path of the block ``ModuleList`` for custom models.
        block_sizes: the ``n`` values for which angular distances are tracked (``()`` for none).
        max_tokens_per_forward: keep at most this many real tokens per forward (evenly spaced, deterministic,
            no RNG consumed); ``None`` keeps all.

    Each forward of the blocks' owner counts once per block: the recomputation of gradient checkpointing during
    backward is recognised (same forward, block already seen) and ignored.

    Padding is excluded through the 2-D ``attention_mask`` the blocks' owner receives. Positions are whatever the
    hooked forward computes: with learned absolute positions (GPT-2), a left-padded batch without
    ``position_ids`` shifts every real token's position, so its BI differs from the unpadded one (the model's
    outputs differ too). RoPE and ALiBi models are unaffected. :func:`~lp_callbacks.measure.measure_depth`
    derives ``position_ids`` from the mask itself.
    """

    def __init__(
        self,
        model: nn.Module | DecoderStack,
        layers_path: str | None = None,
        block_sizes: Iterable[int] = (),
        max_tokens_per_forward: int | None = None,
    ) -> None:
        self.stack = decoder_stack(model, layers_path)
        self.block_sizes = tuple(sorted(set(block_sizes)))
        self.max_tokens_per_forward = max_tokens_per_forward
        self.enabled = False
        self._handles: list[RemovableHandle] = []
        self._mask: Tensor | None = None
        self._root_mask: Tensor | None = None  # the 2-D mask the HF model got, for an owner given another form
        self._selection: tuple[Tensor | None, Tensor | None] | None = None
        self._seen: set[int] = set()
        self._inputs: dict[int, Tensor] = {}
        self._warned_mask = False
        self.attach()

    # ---------------------------------------------------------------- hooks lifecycle
    def attach(self) -> None:
        """(Re)hook the current block list and start fresh metrics sized to it (call after layers change)."""
        self.detach()
        layers = self.stack.layers
        self.num_layers = len(layers)
        device = next((p.device for p in layers.parameters()), torch.device("cpu"))
        self.bi_metric = BlockInfluence(self.num_layers, sync_on_compute=True).to(device)
        self.angular_metrics = {}
        for n in self.block_sizes:
            self._add_angular_metric(n)
        if self.stack.is_hf and self.stack.root is not self.stack.owner:  # an HF forward's args are known by name
            self._handles.append(self.stack.root.register_forward_pre_hook(self._on_root_forward, with_kwargs=True))
        self._handles.append(self.stack.owner.register_forward_pre_hook(self._on_owner_forward, with_kwargs=True))
        for index, layer in enumerate(layers):
            self._handles.append(layer.register_forward_hook(self._layer_hook(index), with_kwargs=True))

    def detach(self) -> None:
        """Remove every hook (the model runs exactly as without the recorder)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._inputs = {}

    def reset(self) -> None:
        """Zero the accumulated statistics, keep the hooks."""
        self.bi_metric.reset()
        for metric in self.angular_metrics.values():
            metric.reset()

    def add_block_size(self, block_size: int) -> None:
        """Also track angular distances over ``block_size`` contiguous blocks (from now on)."""
        if block_size in self.block_sizes:
            return
        self.block_sizes = tuple(sorted({*self.block_sizes, block_size}))
        self._add_angular_metric(block_size)

    def _add_angular_metric(self, block_size: int) -> None:
        if block_size <= self.num_layers:  # on the device of the BI metric
            metric = AngularDistance(self.num_layers, block_size, sync_on_compute=True)
            self.angular_metrics[block_size] = metric.to(self.bi_metric.total.device)

    def take_sums(self) -> tuple[tuple[Tensor, Tensor, Tensor], dict[int, tuple[Tensor, Tensor]]]:
        """The sums recorded since the last reset, reduced across DDP ranks, then :meth:`reset`: ``(total, count,
        skipped)`` of BI and ``n -> (total, count)`` of the angular distances. Every rank must call it together."""
        metric = self.bi_metric
        with metric.sync_context(should_sync=True):
            sums = (metric.total.clone(), metric.count.clone(), metric.skipped.clone())
        angular = {}
        for n, m in self.angular_metrics.items():
            with m.sync_context(should_sync=True):
                angular[n] = (m.total.clone(), m.count.clone())
        self.reset()
        return sums, angular

    @contextlib.contextmanager
    def recording(self, enabled: bool = True) -> Iterator[BlockInfluenceRecorder]:
        """Context in which forwards are recorded."""
        previous, self.enabled = self.enabled, enabled
        try:
            yield self
        finally:
            self.enabled = previous

    # ---------------------------------------------------------------- hook bodies
    def _on_root_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.enabled:
            mask = _mask_from(args, kwargs)
            self._root_mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    def _on_owner_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # A new forward of the model: blocks may count again. Gradient checkpointing recomputes blocks during
        # backward without a new owner forward, so those recomputations are skipped as already seen.
        self._seen = set()
        self._inputs = {}
        mask, root_mask, self._root_mask = _mask_from(args, kwargs), self._root_mask, None  # one owner forward each
        if not (isinstance(mask, Tensor) and mask.dim() == 2) and root_mask is not None:
            mask = root_mask  # e.g. Gemma 3 multimodal hands its text model a dict of 4-D masks
        self._mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        if mask is not None and self._mask is None and not self._warned_mask:
            kind = f"{mask.dim()}-D" if isinstance(mask, Tensor) else type(mask).__name__
            rank_zero_warn(f"BlockInfluenceRecorder: ignoring a {kind} attention mask; all tokens are used.")
            self._warned_mask = True
        self._selection = None

    def _token_selection(self, hidden: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(positions, mask)`` for this forward, computed once: flat indices of the tokens examined
        (``None``: all) and the flat real-token mask of those (``None``: all real).

        Nothing here depends on data values (no ``nonzero``), so nothing waits for the GPU.
        """
        if self._selection is not None:
            return self._selection
        batch_shape = hidden.shape[:-1]
        mask = self._mask
        if mask is not None and tuple(mask.shape) != tuple(batch_shape):
            # e.g. generation with a KV cache: the mask covers past tokens too; keep the current ones.
            mask = mask[..., -batch_shape[-1] :] if mask.shape[:-1] == batch_shape[:-1] else None
        flat_mask = None if mask is None else mask.reshape(-1).to(device=hidden.device, dtype=torch.bool)
        positions = None
        budget, total = self.max_tokens_per_forward, batch_shape.numel()
        if budget is not None and total > budget:
            # evenly spaced positions (padding among them is then masked out): deterministic, no RNG consumed
            positions = torch.linspace(0, total - 1, budget, device=hidden.device).round().long()
            flat_mask = None if flat_mask is None else flat_mask[positions]
        self._selection = (positions, flat_mask)
        return self._selection

    def _rows(self, hidden: Tensor, positions: Tensor | None) -> Tensor:
        flat = hidden.detach().reshape(-1, hidden.shape[-1])  # (B*T, H)
        return flat if positions is None else flat.index_select(0, positions)  # (N, H)

    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            if not self.enabled or index in self._seen:
                return
            inputs, outputs = _hidden_from_args(args, kwargs), _hidden_from_output(output)
            if inputs is None or outputs is None or inputs.shape != outputs.shape:
                return
            self._seen.add(index)
            with torch.no_grad():
                positions, mask = self._token_selection(inputs)
                rows_in, rows_out = self._rows(inputs, positions), self._rows(outputs, positions)
                self.bi_metric.update(index, rows_in, rows_out, mask)
                if self.angular_metrics:
                    self._inputs[index] = rows_in
                    for n, metric in self.angular_metrics.items():
                        first = index - n + 1
                        if first in self._inputs:
                            metric.update(first, self._inputs[first], rows_out, mask)
                    self._inputs.pop(index - self.block_sizes[-1] + 1, None)

        return hook
