"""The depth measures, computed in one process on a model in memory.

For a decoder with blocks 0..L-1 the residual stream has L+1 states: ``x_0`` (the embeddings, the
input of block 0), ``x_l`` (the output of block l-1 = the input of block l) and ``x_L`` (the output of
the last block, before the final norm). One plain forward pass per batch records them with hooks;
from them come

- the output variance of block l: the variance of ``x_{l+1}`` over the hidden dimension, averaged
  over tokens;
- the mean L2 norm of what each sublayer adds to the stream: ``h - x_l`` for attention and
  ``x_{l+1} - h`` for the MLP, where ``h`` is the input of the block's second pre-sublayer norm (not
  reported for blocks with a parallel residual, where that norm reads ``x_l``);
- the angular distance ``arccos(cos(x_l, x_{l+n})) / pi`` for every l and n, averaged over all
  tokens or, as in the paper's code, over the last token of each window.

The layer-removal sweep then evaluates the same batch once per block l with that block bypassed
(its forward returns its input). Blocks before l would recompute exactly the states already
recorded, so they are bypassed too and block 0 hands over the recorded ``x_l`` directly: a removal
pass costs only the blocks after l, and the sweep costs less than L plain passes. Nothing is copied,
saved or reloaded, and every other block keeps its own parameters, including an LNS block's own
1/sqrt(l) scale (the block is skipped, not renumbered).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lns_surgery.core.errors import LNSError

# Decoder block lists of models the registry does not know (post-norm families, custom code).
_COMMON_BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks")
_ANGULAR_CHUNK_ELEMENTS = 1 << 25  # tokens x states x hidden per chunk of the angular computation


@dataclass
class BlockLayout:
    """Where a model's decoder blocks are, and the names of the pre-sublayer norms inside a block."""

    path: str
    blocks: nn.ModuleList
    norms: tuple[str, ...]


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the analysis runs it directly)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def block_layout(model: nn.Module) -> BlockLayout:
    """The decoder blocks of a stock, LNS or folded model of any registry architecture; for other
    decoders the usual block-list paths, without sublayer norms."""
    from lns_surgery.modeling.lns_layers import resolve_layers

    model = unwrap(model)
    lns = getattr(model.config, "lns", None)
    if lns:
        return BlockLayout(lns["layers"], resolve_layers(model, lns["layers"]), tuple(lns["norms"]))
    try:
        from lns_surgery.conversion import architecture_for_model

        arch = architecture_for_model(model)
        return BlockLayout(arch.layers, resolve_layers(model, arch.layers), tuple(arch.norms))
    except (LNSError, ValueError, AttributeError):
        pass
    for path in _COMMON_BLOCK_PATHS:
        try:
            blocks = resolve_layers(model, path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return BlockLayout(path, blocks, ())
    raise LNSError(f"cannot find the decoder blocks of {type(model).__name__}")


def max_positions(config) -> int | None:
    """The longest sequence the model's position encoding supports, when its config says."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _hidden_input(args, kwargs) -> torch.Tensor:
    # Every transformers decoder block takes the residual stream as its first argument.
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def _replaced_forwards(replacements: dict[nn.Module, callable]):
    """Give modules another forward for the duration of the block (hooks still run around it)."""
    saved = {}
    try:
        for module, forward in replacements.items():
            saved[module] = module.__dict__.get("forward")  # accelerate keeps its own wrapper there
            module.forward = forward
        yield
    finally:
        for module, previous in saved.items():
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def _passthrough(*args, **kwargs):
    return _hidden_input(args, kwargs)


@contextlib.contextmanager
def skip_blocks(model: nn.Module, indices):
    """Run ``model`` with the decoder blocks at 0-based ``indices`` bypassed: each returns its input.

    The result equals the model with those blocks deleted, except that the remaining blocks keep
    their original positions (an LNS block keeps its own scale, a Gemma-2 block its attention type).
    """
    layout = block_layout(model)
    count = len(layout.blocks)
    indices = sorted(set(int(i) for i in indices))
    if any(not 0 <= i < count for i in indices):
        raise LNSError(f"block index out of range: the model has blocks 0..{count - 1}")
    with _replaced_forwards({layout.blocks[i]: _passthrough for i in indices}):
        yield model


def _jump_to(state: torch.Tensor):
    def forward(*args, **kwargs):
        return state.to(_hidden_input(args, kwargs).device)

    return forward


def _removal_forwards(blocks: nn.ModuleList, index: int, state: torch.Tensor) -> dict:
    """Forwards that skip block ``index`` and reuse ``state`` (its recorded input) for everything before it."""
    replacements = {blocks[0]: _jump_to(state)}
    for earlier in range(1, index + 1):
        replacements[blocks[earlier]] = _passthrough
    return replacements


def window_nll(logits: torch.Tensor, windows: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over the windows (in float32), and the token count."""
    predicted = logits[:, :-1].float()
    targets = windows[:, 1:].to(predicted.device)
    loss = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(loss), targets.numel()


def perplexity_from(nll_sum: float, count: int) -> float:
    try:
        return math.exp(nll_sum / count)
    except OverflowError:
        return math.inf


def input_device(model: nn.Module) -> torch.device:
    return unwrap(model).get_input_embeddings().weight.device


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, use_cache=False).logits


def evaluate_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """One plain evaluation pass: summed NLL and predicted-token count over ``windows``."""
    model = unwrap(model)
    device = input_device(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(device)
            nll, tokens = window_nll(_logits(model, batch), batch)
            total += nll
            count += tokens
    return total, count


class _StreamRecorder:
    """Hooks that record, during one forward pass, every block's input, the last block's output and
    the input of each block's second pre-sublayer norm."""

    def __init__(self, layout: BlockLayout):
        self.layout = layout
        count = len(layout.blocks)
        self.inputs: list[torch.Tensor | None] = [None] * count
        self.mids: list[torch.Tensor | None] = [None] * count
        self.last_output: torch.Tensor | None = None
        self.active = True  # off during the removal passes, which must not overwrite the states they reuse
        self.handles = []
        for index, block in enumerate(layout.blocks):
            self.handles.append(block.register_forward_pre_hook(self._input_hook(index), with_kwargs=True))
            if len(layout.norms) >= 2:
                norm = block.get_submodule(layout.norms[1])
                self.handles.append(norm.register_forward_pre_hook(self._mid_hook(index), with_kwargs=True))
        self.handles.append(layout.blocks[-1].register_forward_hook(self._output_hook))

    def _input_hook(self, index):
        def hook(module, args, kwargs):
            if self.active:
                self.inputs[index] = _hidden_input(args, kwargs)

        return hook

    def _mid_hook(self, index):
        def hook(module, args, kwargs):
            if self.active:
                self.mids[index] = _hidden_input(args, kwargs)

        return hook

    def _output_hook(self, module, args, output):
        if not self.active:
            return
        if not isinstance(output, torch.Tensor):
            raise LNSError(
                f"{type(module).__name__} returns {type(output).__name__}, not the hidden states; "
                "the depth analysis needs transformers >= 5 decoder blocks"
            )
        self.last_output = output

    def states(self) -> list[torch.Tensor]:
        if any(state is None for state in self.inputs) or self.last_output is None:
            raise LNSError("the forward pass did not run every decoder block")
        return [*self.inputs, self.last_output]

    def clear(self):
        self.inputs = [None] * len(self.inputs)
        self.mids = [None] * len(self.mids)
        self.last_output = None

    def remove(self):
        for handle in self.handles:
            handle.remove()


def angular_distance_sums(states: list[torch.Tensor], last_token: bool) -> tuple[torch.Tensor, int]:
    """Sum over tokens of ``arccos(cos(x_i, x_j)) / pi`` for every pair of states, as an
    ``[S, S]`` float64 matrix (S = number of states), and the number of tokens summed."""
    hidden = states[0].shape[-1]
    flat = [(state[:, -1, :] if last_token else state).reshape(-1, hidden) for state in states]
    tokens = flat[0].shape[0]
    chunk = max(1, _ANGULAR_CHUNK_ELEMENTS // (len(states) * hidden))
    total = torch.zeros(len(states), len(states), dtype=torch.float64)
    for start in range(0, tokens, chunk):
        stacked = torch.stack([f[start : start + chunk].float() for f in flat], dim=1)  # [n, S, H]
        unit = F.normalize(stacked, dim=-1)
        cosine = torch.bmm(unit, unit.transpose(1, 2)).clamp_(-1.0, 1.0)
        total += (torch.arccos(cosine) / math.pi).sum(dim=0).double().cpu()
    return total, tokens


def depth_measures(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    last_token: bool = False,
    removal: bool = True,
    progress: bool = False,
    description: str | None = None,
) -> dict:
    """All the measures of the module docstring on ``windows`` (``[N, T]`` token ids), in one process.

    Returns plain Python numbers: ``loss`` and ``perplexity``; per state (L+1 entries) ``variance``
    and ``residual_norm``; per block (L entries) ``attention_update_norm`` and ``mlp_update_norm``
    (None where not measurable), ``removal_loss`` and ``removal_perplexity`` (None without
    ``removal``); ``angular_distance[l][n-1]`` for n = 1..L-l; and the token counts.
    """
    from tqdm.auto import tqdm

    model = unwrap(model)
    layout = block_layout(model)
    blocks = layout.blocks
    count = len(blocks)
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise LNSError("windows must be a [number, length >= 2] tensor of token ids")
    device = input_device(model)
    batches = [windows[start : start + batch_size] for start in range(0, len(windows), batch_size)]

    was_training = model.training
    model.eval()
    nll_sum, predicted = 0.0, 0
    states_count = count + 1
    variance_sum = torch.zeros(states_count, dtype=torch.float64)
    norm_sum = torch.zeros(states_count, dtype=torch.float64)
    attention_sum = torch.zeros(count, dtype=torch.float64)
    mlp_sum = torch.zeros(count, dtype=torch.float64)
    splittable = [len(layout.norms) >= 2] * count
    angular_sum = torch.zeros(states_count, states_count, dtype=torch.float64)
    angular_tokens = 0
    removal_nll = [0.0] * count
    stream_tokens = 0

    recorder = _StreamRecorder(layout)
    bar = tqdm(total=len(batches) * (count + 1 if removal else 1), desc=description, unit="pass",
               disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for batch in batches:
                batch = batch.to(device)
                recorder.clear()
                recorder.active = True
                nll, tokens = window_nll(_logits(model, batch), batch)
                nll_sum += nll
                predicted += tokens
                states = recorder.states()
                stream_tokens += batch.numel()
                for index, state in enumerate(states):
                    values = state.float()
                    variance_sum[index] += values.var(dim=-1, unbiased=False).sum().item()
                    norm_sum[index] += values.norm(dim=-1).sum().item()
                for index, mid in enumerate(recorder.mids):
                    if not splittable[index]:
                        continue
                    if mid is None or torch.equal(mid, states[index]):  # parallel residual: the norm reads the block input
                        splittable[index] = False
                        continue
                    attention_sum[index] += (mid.float() - states[index].float()).norm(dim=-1).sum().item()
                    mlp_sum[index] += (states[index + 1].float() - mid.float()).norm(dim=-1).sum().item()
                sums, tokens_used = angular_distance_sums(states, last_token)
                angular_sum += sums
                angular_tokens += tokens_used
                recorder.active = False
                recorder.clear()
                bar.update(1)
                if removal:
                    for index in range(count):
                        with _replaced_forwards(_removal_forwards(blocks, index, states[index])):
                            removal_nll[index] += window_nll(_logits(model, batch), batch)[0]
                        bar.update(1)
                del states
    finally:
        recorder.remove()
        bar.close()
        model.train(was_training)

    loss = nll_sum / predicted
    angular = [[angular_sum[i, i + n].item() / angular_tokens for n in range(1, states_count - i)] for i in range(count)]
    return {
        "num_layers": count,
        "windows": len(windows),
        "seq_len": windows.shape[1],
        "tokens": stream_tokens,
        "predicted_tokens": predicted,
        "loss": loss,
        "perplexity": perplexity_from(nll_sum, predicted),
        "variance": (variance_sum / stream_tokens).tolist(),
        "residual_norm": (norm_sum / stream_tokens).tolist(),
        "attention_update_norm": [attention_sum[i].item() / stream_tokens if splittable[i] else None for i in range(count)],
        "mlp_update_norm": [mlp_sum[i].item() / stream_tokens if splittable[i] else None for i in range(count)],
        "angular_distance": angular,
        "angular_tokens": angular_tokens,
        "removal_loss": [value / predicted for value in removal_nll] if removal else [None] * count,
        "removal_perplexity": [perplexity_from(value, predicted) for value in removal_nll] if removal else [None] * count,
    }
