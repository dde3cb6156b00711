"""A causal LM's forward one decoder block at a time: each block an fp32 copy on the compute device, the model itself left
where and in the dtype it is stored (:mod:`allocator.model.placement`).

What a whole forward holds at once (every weight in the compute dtype on the device) becomes one block's weights plus
the hidden states of the windows being run, so evaluating a model larger than the device, or stored in bf16, costs
no second copy of it. Weight overlays (module name -> weight: a quantized variant) are swapped into each block's copy
as it runs, in fp32, so a bf16-stored model evaluates its quantized variants without rounding them to bf16.

:meth:`BlockwiseForward.check` compares the result with the model's own forward on one window; an architecture whose
head this does not reproduce (anything but final norm -> LM head -> optional logit soft-capping) fails the check and
the caller runs whole forwards instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import PreTrainedModel

from allocator.model.calibration import BlockInputs, capture_block_inputs, run_block
from allocator.model.layers import decoder_layers, decoder_prefix, swapped_weights
from allocator.model.placement import COMPUTE_DTYPE, CPU, is_placed, working_block


class BlockwiseForward:
    """``model``'s forward computed block by block on ``device`` (see the module doc)."""

    def __init__(self, model: PreTrainedModel, device: torch.device = CPU) -> None:
        self.model = model
        self.device = device
        self.layers = decoder_layers(model)
        self.prefix = decoder_prefix(model) + "."
        modules = {module: name for name, module in model.named_modules()}
        norm = getattr(getattr(model, "model", None), "norm", None)
        head = model.get_output_embeddings()
        self.norm_name = modules.get(norm) if isinstance(norm, nn.Module) else None
        self.head_name = modules.get(head) if isinstance(head, nn.Module) else None
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.stored_fp32 = all(p.dtype == COMPUTE_DTYPE for p in model.parameters() if p.is_floating_point())
        self._placed = [is_placed(layer, device) for layer in self.layers]
        """Which blocks already are on the device in fp32 (then run as they are): the model's storage does not change
        while this runs (overlays go into the blocks' copies, or are swapped in at the stored dtype)."""

    def handles(self, overlay: Mapping[str, torch.Tensor]) -> bool:
        """Whether every name of ``overlay`` is inside a block or the norm or head (not, say, the embeddings)."""
        outside = {self.norm_name, self.head_name}
        return self.norm_name is not None and self.head_name is not None and all(
            name.startswith(self.prefix) or name.rsplit(".", 1)[0] in outside or name in outside for name in overlay)

    def _block_overlay(self, index: int, overlay: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        start = f"{self.prefix}{index}."
        return {name[len(start):]: overlay[name] for name in overlay if name.startswith(start)}  # reads (decodes) only these

    def capture(self, windows: torch.Tensor, batch_size: int | None = None) -> BlockInputs:
        """What enters the first block for ``windows`` (in batches of ``batch_size``, default all), and every block's
        keyword arguments, fp32 on the device."""
        return capture_block_inputs(self.model, windows, batch_size=batch_size or len(windows), device=self.device)

    @torch.inference_mode()
    def run_blocks(self, hidden: torch.Tensor, captured: BlockInputs, overlay: Mapping[str, torch.Tensor], start: int = 0,
                   stop: int | None = None) -> torch.Tensor:
        """``hidden`` (the input of block ``start``) through blocks ``start .. stop - 1`` (default: to the last), with
        ``overlay``'s weights swapped into each block's working copy."""
        for index in range(start, len(self.layers) if stop is None else stop):
            local = self._block_overlay(index, overlay) if overlay else {}
            stored = self.layers[index]
            if self._placed[index] and not local:  # the common case of a probe's tail: no copy, no swap, no lookups
                hidden = run_block(stored, hidden, captured.block_kwargs[index])
                continue
            with working_block(stored, self.device) as block, swapped_weights(block, local):
                hidden = run_block(block, hidden, captured.block_kwargs[index])
        return hidden

    @torch.inference_mode()
    def final_hidden(self, windows: torch.Tensor, overlay: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The last block's output for ``windows`` (batch x seqlen token ids), fp32 on the device."""
        captured = self.capture(windows)
        return self.run_blocks(captured.hidden_states[0], captured, overlay)

    @torch.inference_mode()
    def logprobs(self, hidden: torch.Tensor, overlay: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Next-token log-probabilities of one window's final hidden states (seqlen x hidden) at every position but the
        last (seqlen-1 x vocab, fp32, on the CPU)."""
        assert self.norm_name is not None and self.head_name is not None
        norm, head = self.model.get_submodule(self.norm_name), self.model.get_submodule(self.head_name)
        outside = {name: overlay[name] for name in overlay if not name.startswith(self.prefix)}
        with swapped_weights(self.model, outside), working_block(norm, self.device) as norm_c, working_block(head, self.device) as head_c:
            logits = head_c(norm_c(hidden))[:-1]  # all positions, as the model's forward shapes it (same bits), then cut
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    @torch.inference_mode()
    def check(self, window: torch.Tensor) -> bool:
        """Whether this reproduces the model's own forward on ``window`` (to fp32 rounding, or to the storage dtype's)."""
        if not self.handles({}):
            return False
        mine = self.logprobs(self.final_hidden(window[None], {})[0], {})
        whole = torch.log_softmax(self.model(window[None], use_cache=False).logits[0, :-1].float(), dim=-1)
        tolerance = 1e-4 if self.stored_fp32 else 0.1
        return bool(torch.allclose(mine, whole.float().cpu(), rtol=tolerance, atol=tolerance))
