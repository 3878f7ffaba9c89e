"""The fast inference path: the same modules and weights as the eager DC-AE, faster kernels.

`FastPath` walks an `Encoder`/`Decoder` and runs each block with fused or cheaper kernels; blocks it
does not know fall back to their own `forward`, so every model stays runnable. What it changes:

- everywhere: channels-last activations (the layout cuDNN/oneDNN and the norms below want);
  BatchNorm folded into the preceding conv; RMS norm as one fused op over the contiguous channel
  dim (no movedim copies); activations and residual adds in place (less memory traffic, lower peak).
- CPU fp32: dense 3x3 convs through Winograd F(4x4, 3x3) (`dcae.models.winograd`); that is where
  80% of the CPU time goes.
- CUDA: Triton kernels for the channel RMS norm and ReLU linear attention when Triton is installed
  (`dcae.models.fast_triton`), plain cuDNN convs (channels-last) otherwise.
- fp16: norms and attention run in fp32 as in the eager model; `DCAE.decode` re-runs a non-finite fp16
  result in fp32 (see `fp16_overflow_scan` for where activations leave the fp16 range).

It only runs for inference (module in eval mode, autograd off); training always takes the eager path.
`torch.compile` should see the eager modules instead (`compile_dcae`): Inductor does its own fusion,
and the weight caches here would only add guards.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcae.models import fast_triton, winograd
from dcae.models.layers import (
    ConvLayer,
    ConvPixelShuffleUpsample,
    ConvPixelUnshuffleDownsample,
    EfficientViTBlock,
    GLUMBConv,
    InterpolateConvUpsample,
    LiteMLA,
    OpSequential,
    PlainBlock,
    ResBlock,
    ResidualBlock,
    RMSNorm2d,
    relu_quadratic_attention,
)
from dcae.models.linear_attention import (  # re-exported: the PyTorch reference of the kernels
    relu_linear_attention_apply,
    relu_linear_attention_kv,
    relu_linear_attention_tokens,
)
from dcae.utils.devices import match_inductor_to_aten_isa

FP16_MAX = 65504.0


@dataclass
class FastOptions:
    """Switches of the fast path; all on by default, each used only where it applies."""

    winograd: bool = True  # CPU fp32 dense 3x3 convs
    fold_bn: bool = True  # eval-mode BatchNorm folded into the conv before it
    channels_last: bool = True
    triton: bool = True  # CUDA only, when Triton imports
    # CUDA only: let cuDNN time its conv algorithms for each new shape (the first call of a shape is slower)
    # for the fast path's convs alone; the global torch.backends.cudnn.benchmark setting is left as it is.
    # Off until measured on a GPU (benchmarks/gpu_check.py compares both).
    cudnn_benchmark: bool = False
    # Winograd pays off above these sizes (measured on AVX-512: below them oneDNN's direct conv wins).
    winograd_min_channels: int = 64
    winograd_min_tiles: int = 64
    # Attention/GLU blocks on maps whose hidden activations exceed this many elements run in bands of
    # rows (exact; bounds the memory of 4K decodes, whose 1/8-res stages are otherwise the peak).
    band_elements: int = 1 << 26
    # fp16 only: top-level units ("decoder.stages.1", ...) to run in fp32; see `fp16_overflow_scan`.
    fp32_units: tuple[str, ...] = ()


@contextlib.contextmanager
def _cudnn_autotune(enabled: bool):
    """torch.backends.cudnn.benchmark on for the enclosed convs only; every other cuDNN setting untouched."""
    if not enabled:
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def encoder_units(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The encoder's top-level units in execution order: stem, stages, bottleneck."""
    units = [("encoder.project_in", encoder.project_in)]
    units += [(f"encoder.stages.{i}", s) for i, s in enumerate(encoder.stages)]
    return units + [("encoder.project_out", encoder.project_out)]


def decoder_units(decoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder's top-level units in execution order: bottleneck, stages (deepest first), head."""
    units = [("decoder.project_in", decoder.project_in)]
    units += [(f"decoder.stages.{i}", decoder.stages[i]) for i in reversed(range(len(decoder.stages)))]
    return units + [("decoder.project_out", decoder.project_out)]


class EagerRunner:
    """The eager modules, with the same `run_units` interface as `FastPath` (used by tiling)."""

    @staticmethod
    def run_units(units: list[tuple[str, nn.Module]], x: torch.Tensor) -> torch.Tensor:
        for _, unit in units:
            x = unit(x)
        return x


def _tensors_key(tensors: Iterable[torch.Tensor | None]) -> tuple:
    """Identity + in-place version of the tensors a cached value was derived from (detects optimizer
    steps, load_state_dict and .to())."""
    return tuple((t.data_ptr(), _version(t), t.dtype, t.device) if t is not None else None for t in tensors)


def _version(t: torch.Tensor) -> int:
    return 0 if t.is_inference() else t._version  # inference tensors cannot change in place


class FastPath:
    """Runs DC-AE encoders/decoders with the fast kernels. One instance per model (it caches folded and
    transformed weights, keyed weakly by module and invalidated when the weights change)."""

    def __init__(self, options: FastOptions | None = None) -> None:
        self.options = options or FastOptions()
        self._cache: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, object]] = weakref.WeakKeyDictionary()
        self._triton = None
        self._handlers: dict[type, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
            OpSequential: self._sequential,
            ResidualBlock: self._residual,
            PlainBlock: lambda m, x: self.run(m.main, x),  # residual autoencoding switched off
            ConvLayer: self.conv_layer,
            EfficientViTBlock: lambda m, x: self.run(m.local_module, self.run(m.context_module, x)),
            LiteMLA: self._lite_mla,
            GLUMBConv: self._glumbconv,
            RMSNorm2d: self.rms_norm,
            ConvPixelUnshuffleDownsample: self._down,
            ConvPixelShuffleUpsample: self._up,
            InterpolateConvUpsample: self._interp_up,
            nn.Identity: lambda m, x: x,
        }

    # ----------------------------------------------------------------- entry points
    @staticmethod
    def applies(model: nn.Module) -> bool:
        """Inference only: eval mode (BatchNorm statistics fixed) and no autograd."""
        return not model.training and not torch.is_grad_enabled()

    def encode(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.run_units(encoder_units(encoder), x)

    def decode(self, decoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
        return self.run_units(decoder_units(decoder), z)

    def run_units(self, units: list[tuple[str, nn.Module]], x: torch.Tensor) -> torch.Tensor:
        """Run top-level units (stem, stages, bottleneck, head; see `encoder_units`) in order.

        fp16: units listed in `options.fp32_units` (from `fp16_overflow_scan`) run on an fp32 copy and
        their output stays fp32 until a unit that is back in range. A non-finite fp16 result is recomputed
        with every unit in fp32, with a warning: correct output first, speed second.
        """
        dtype = x.dtype
        with _cudnn_autotune(self.options.cudnn_benchmark and x.is_cuda):
            out = self._run_units_once(units, x, self.options.fp32_units)
            capturing = out.is_cuda and torch.cuda.is_current_stream_capturing()  # no host sync inside a graph
            if dtype == torch.float16 and not capturing and not torch.isfinite(out).all():
                warnings.warn(
                    "fp16 activations overflowed; recomputed in fp32. Use bf16, or pass fp32_units from "
                    "dcae.models.fast.fp16_overflow_scan to enable_fast_path.",
                    stacklevel=4,
                )
                out = self._run_units_once(units, x, tuple(name for name, _ in units)).to(dtype)
        return out

    def _run_units_once(self, units: list[tuple[str, nn.Module]], x: torch.Tensor, fp32_units) -> torch.Tensor:
        dtype = x.dtype
        x = self._layout(x)
        for name, unit in units:
            if dtype == torch.float16 and name in fp32_units:
                x = self.run(self._fp32_copy(unit), x.float())
            else:
                x = self.run(unit, x.to(dtype))
        return x.to(dtype).contiguous()

    def _fp32_copy(self, unit: nn.Module) -> nn.Module:
        params = list(unit.parameters()) + list(unit.buffers())
        return self._cached(unit, "fp32", params, lambda: copy.deepcopy(unit).float())

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        handler = self._handlers.get(type(module))
        return handler(module, x) if handler is not None else module(x)

    # ----------------------------------------------------------------- containers
    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.options.channels_last else x

    def _sequential(self, seq: OpSequential, x: torch.Tensor) -> torch.Tensor:
        for op in seq.op_list:
            x = self.run(op, x)
        return x

    def _residual(self, block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
        main, shortcut = block.main, block.shortcut
        if isinstance(main, ResBlock) and isinstance(shortcut, nn.Identity):
            # The residual add happens inside the second conv's epilogue (in place, no extra tensor).
            return self.conv_layer(main.conv2, self.conv_layer(main.conv1, x), residual=x)
        y = self.run(main, x)
        s = self.run(shortcut, x)
        # Add in place when y owns its memory (the usual case: a conv/norm output), saving a tensor.
        if y.untyped_storage().data_ptr() not in (x.untyped_storage().data_ptr(), s.untyped_storage().data_ptr()):
            return y.add_(s)
        return y + s

    # ----------------------------------------------------------------- convs and norms
    def conv_layer(self, layer: ConvLayer, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """conv -> norm -> act (-> + residual), with BatchNorm folded into the conv when possible."""
        weight, bias, norm = self._folded(layer)
        y = self._conv(layer.conv, weight, bias, x, layer)
        if norm is not None:
            y = self.run(norm, y)
        if layer.act is not None:
            y = _act_inplace(layer.act, y)
        if residual is not None:
            y = y.add_(residual)
        return y

    def _folded(self, layer: ConvLayer) -> tuple[torch.Tensor, torch.Tensor | None, nn.Module | None]:
        """The conv's weight and bias with an eval BatchNorm folded in (cached), else the module's own.

        Other weights are not copied: a channels-last copy of every weight would double the GPU memory
        of the weights; cuDNN converts them per call instead (or call `model.to(memory_format=
        torch.channels_last)` once to avoid that too)."""
        conv, norm = layer.conv, layer.norm
        if not (self.options.fold_bn and isinstance(norm, nn.BatchNorm2d) and not norm.training):
            return conv.weight, conv.bias, norm
        tensors = [conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var]
        channels_last = self.options.channels_last and conv.weight.device.type == "cuda"
        value = self._cached(layer, "fold", tensors, lambda: _fold(conv, norm, channels_last))
        return value[0], value[1], None

    def _conv(
        self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, owner: nn.Module
    ) -> torch.Tensor:
        if self._use_winograd(conv, x):
            u = self._cached(owner, "winograd", [weight, bias], lambda: winograd.winograd_weight(weight))
            return winograd.conv3x3_winograd(x, u, bias)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def _use_winograd(self, conv: nn.Conv2d, x: torch.Tensor) -> bool:
        o = self.options
        if not (o.winograd and x.device.type == "cpu" and x.dtype == torch.float32):
            return False
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1:
            return False
        if conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            return False
        if min(conv.in_channels, conv.out_channels) < o.winograd_min_channels:
            return False
        b, _, h, w = x.shape
        return b * -(-h // winograd.TILE) * -(-w // winograd.TILE) >= o.winograd_min_tiles

    def rms_norm(self, norm: RMSNorm2d, x: torch.Tensor) -> torch.Tensor:
        """Channel RMS norm in fp32; one fused kernel over the contiguous C of channels-last memory."""
        if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last) or x.shape[1] == 1:
            return norm(x)
        kernels = self._kernels(x)
        if kernels is not None:
            return kernels.rms_norm_channels_last(x, norm.weight, norm.bias, norm.eps)
        xt = x.permute(0, 2, 3, 1)
        y = F.rms_norm(xt.float(), (x.shape[1],), norm.weight.float(), norm.eps).add_(norm.bias.float())
        return y.to(x.dtype).permute(0, 3, 1, 2)

    # ----------------------------------------------------------------- blocks
    def _lite_mla(self, m: LiteMLA, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = m.head_dim
        if h * w <= d:  # tiny maps: the eager (quadratic) kernel, as the reference does
            qkv = self._qkv(m, x, 0, h)
            q, k, v = qkv.reshape(b, -1, 3 * d, h * w).chunk(3, dim=2)
            out = relu_quadratic_attention(F.relu(q), F.relu(k), v).to(x.dtype).reshape(b, -1, h, w)
            return self.conv_layer(m.proj, out)
        ops = self._kernels(x) or _TorchAttention
        rows = self._band_rows(x, 3 * c * (1 + len(m.aggreg)))
        if rows >= h:
            t = self._tokens(m, self._qkv(m, x, 0, h))
            out = ops.relu_linear_attention_apply(t, *ops.relu_linear_attention_kv(t, d), d)
            return self.conv_layer(m.proj, self._from_tokens(out.to(x.dtype), h, w))
        # Large maps, in bands of rows: the K^T V and sum(K) statistics are sums over all tokens, so a first
        # pass accumulates them band by band and a second applies them (recomputing q per band). Exact,
        # and the full-size qkv (3x the block's input, 6x in fp32) never exists.
        kv = ks = None
        for r0 in range(0, h, rows):
            t = self._tokens(m, self._qkv(m, x, r0, min(h, r0 + rows)))
            kv_b, ks_b = ops.relu_linear_attention_kv(t, d)
            kv, ks = (kv_b, ks_b) if kv is None else (kv.add_(kv_b), ks.add_(ks_b))
        out = torch.empty_like(x)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            t = self._tokens(m, self._qkv(m, x, r0, r1))
            att = self._from_tokens(ops.relu_linear_attention_apply(t, kv, ks, d).to(x.dtype), r1 - r0, w)
            out[:, :, r0:r1] = self.conv_layer(m.proj, att)
        return out

    def _qkv(self, m: LiteMLA, x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """qkv (+ multi-scale aggregates) of rows [r0, r1), computed with the halo the aggregation needs."""
        halo = max((agg[0].kernel_size[0] // 2 for agg in m.aggreg), default=0)
        a0, a1 = max(0, r0 - halo), min(x.shape[2], r1 + halo)
        qkv = self.conv_layer(m.qkv, x[:, :, a0:a1] if (a0, a1) != (0, x.shape[2]) else x)
        if len(m.aggreg):
            qkv = torch.cat([qkv] + [agg(qkv) for agg in m.aggreg], dim=1)
        return qkv[:, :, r0 - a0 : r1 - a0] if (a0, a1) != (r0, r1) else qkv

    @staticmethod
    def _tokens(m: LiteMLA, qkv: torch.Tensor) -> torch.Tensor:
        """Token-major view (B, N, heads, 3d) of a channels-last qkv (a copy only if it is not channels-last)."""
        b, _, h, w = qkv.shape
        return qkv.permute(0, 2, 3, 1).reshape(b, h * w, -1, 3 * m.head_dim)

    @staticmethod
    def _from_tokens(out: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return out.reshape(out.shape[0], h, w, -1).permute(0, 3, 1, 2)

    def _glumbconv(self, m: GLUMBConv, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        rows = self._band_rows(x, m.inverted_conv.conv.out_channels)
        if rows >= h:
            return self._glumbconv_rows(m, x, 0, h)
        # Large maps, in bands of rows with one row of halo for the depthwise 3x3: the 8x-wide hidden
        # activations only ever exist for one band.
        out = torch.empty_like(x)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            out[:, :, r0:r1] = self._glumbconv_rows(m, x, r0, r1)
        return out

    def _glumbconv_rows(self, m: GLUMBConv, x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        a0, a1 = max(0, r0 - 1), min(x.shape[2], r1 + 1)
        xb = x if (a0, a1) == (0, x.shape[2]) else x[:, :, a0:a1]
        y = self.conv_layer(m.depth_conv, self.conv_layer(m.inverted_conv, xb))
        if (a0, a1) != (r0, r1):
            y = y[:, :, r0 - a0 : r1 - a0]
        y, gate = y.chunk(2, dim=1)
        return self.conv_layer(m.point_conv, y * _act_inplace(m.glu_act, gate))

    def _band_rows(self, x: torch.Tensor, hidden_channels: int) -> int:
        """Rows per band so that a (B, hidden, rows, W) activation stays under `options.band_elements`."""
        b, _, h, w = x.shape
        return max(1, min(h, self.options.band_elements // max(1, b * hidden_channels * w)))

    def _down(self, m: ConvPixelUnshuffleDownsample, x: torch.Tensor) -> torch.Tensor:
        return self._layout(F.pixel_unshuffle(self.conv_layer(m.conv, x), m.factor))

    def _up(self, m: ConvPixelShuffleUpsample, x: torch.Tensor) -> torch.Tensor:
        return self._layout(F.pixel_shuffle(self.conv_layer(m.conv, x), m.factor))

    def _interp_up(self, m: InterpolateConvUpsample, x: torch.Tensor) -> torch.Tensor:
        return self.conv_layer(m.conv, F.interpolate(x, scale_factor=m.factor, mode="nearest"))

    # ----------------------------------------------------------------- helpers
    def _cached(self, module: nn.Module, what: str, tensors: list, make: Callable[[], object]):
        key = (what, _tensors_key(tensors))
        entry = self._cache.get(module)
        if entry is not None and what in entry and entry[what][0] == key:
            return entry[what][1]
        # Built outside inference mode, so that the cached tensors keep a version counter.
        with torch.inference_mode(False), torch.no_grad():
            value = make()
        self._cache.setdefault(module, {})[what] = (key, value)
        return value

    def _kernels(self, x: torch.Tensor):
        """The Triton kernels module for CUDA tensors when enabled and importable, else None."""
        if not self.options.triton or x.device.type != "cuda":
            return None
        if self._triton is None:
            if not fast_triton.available() or torch.cuda.is_current_stream_capturing():
                return fast_triton if fast_triton.available() else None  # decided on an uncaptured call
            problem = check_kernels(fast_triton, x.device)
            if problem is not None:
                warnings.warn(f"Triton kernels disabled, PyTorch ops used instead: {problem}", stacklevel=2)
            self._triton = fast_triton if problem is None else False
        return self._triton or None

    def cache_bytes(self) -> int:
        """Memory held by the caches: folded weights and Winograd filters (4x the 3x3 weights they replace)."""
        total = 0
        for entries in self._cache.values():
            for _, value in entries.values():
                tensors = value if isinstance(value, tuple) else (value,)
                total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
                if isinstance(value, nn.Module):
                    total += sum(p.numel() * p.element_size() for p in value.parameters())
        return total

    def clear_cache(self) -> None:
        self._cache = weakref.WeakKeyDictionary()

    # Copies and pickles (torch.save of a whole model) carry the options, never the weight caches.
    def __deepcopy__(self, memo: dict) -> FastPath:
        return FastPath(self.options)

    def __getstate__(self) -> dict:
        return {"options": self.options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["options"])


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """conv then eval BatchNorm == one conv with w * s and (b - mean) * s + beta, s = gamma / sqrt(var + eps).
    Computed in fp64 so folding adds no error of its own."""
    weight, bias = conv.weight, conv.bias
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    b0 = bias.double() if bias is not None else torch.zeros_like(scale)
    bias = ((b0 - bn.running_mean.double()) * scale + bn.bias.double()).to(weight.dtype)
    weight = (weight.double() * scale.view(-1, 1, 1, 1)).to(weight.dtype)
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    return weight, bias


def _act_inplace(act: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(act, nn.ReLU):
        return y.relu_()
    if isinstance(act, nn.SiLU):
        return F.silu(y, inplace=True)
    return act(y)


def check_kernels(kernels, device: torch.device) -> str | None:
    """None when `kernels` (the interface of `dcae.models.fast_triton`) give the PyTorch results on small
    inputs on `device`, else what went wrong. Run once before a FastPath uses Triton: a Triton version
    that cannot compile the kernels, or computes them wrongly, must cost speed, never a failed decode."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 5, 3, generator=g) * 3).to(device).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(64, generator=g).to(device) + 0.5, torch.randn(64, generator=g).to(device)
    t = torch.randn(2, 15, 2, 3 * 32, generator=g).to(device)  # (B, N, heads, 3d) tokens, d = 32
    want_norm = F.rms_norm(x.permute(0, 2, 3, 1), (64,), weight, 1e-5).add(bias).permute(0, 3, 1, 2)
    want_attn = relu_linear_attention_tokens(t, 32)
    try:
        got_norm = kernels.rms_norm_channels_last(x, weight, bias, 1e-5)
        got_attn = kernels.relu_linear_attention_apply(t, *kernels.relu_linear_attention_kv(t, 32), 32)
    except Exception as exc:  # compilation or launch failure
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    for what, got, want in (("RMS norm", got_norm, want_norm), ("linear attention", got_attn, want_attn)):
        if got.shape != want.shape:
            return f"the {what} kernel returned shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        if not err < 1e-4:  # fp32 both: rounding is ~1e-7
            return f"the {what} kernel differs from PyTorch by {err:.2e} (relative)"
    return None


class _TorchAttention:
    """The PyTorch implementations, with the interface of `dcae.models.fast_triton`."""

    relu_linear_attention_kv = staticmethod(relu_linear_attention_kv)
    relu_linear_attention_apply = staticmethod(relu_linear_attention_apply)


# ----------------------------------------------------------------------------- fp16 range scan
def fp16_overflow_scan(model: nn.Module, images: torch.Tensor, limit: float = FP16_MAX / 4) -> dict:
    """Where do activations leave the fp16 range? Runs encode+decode in fp32 with forward hooks.

    Returns {"max_abs": {module name: max |output|}, "units": {unit name: max |activation| inside or
    at its input}, "fp32_units": names of units over `limit`}. `limit` keeps a 4x margin below the
    fp16 maximum (65504) because other images go higher than the scanned ones. Pass "fp32_units" to
    `model.enable_fast_path(fp32_units=...)` to run exactly those parts in fp32 under fp16.
    """
    max_abs: dict[str, float] = {}

    def hook(name: str):
        def record(_module, _inputs, output) -> None:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                max_abs[name] = max(max_abs.get(name, 0.0), output.detach().abs().max().item())

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    was_enabled = getattr(model, "fast_path_enabled", False)
    try:
        if was_enabled:
            model.disable_fast_path()  # hooks see the eager modules
        with torch.no_grad():
            model.decode(model.encode(images.float()))
    finally:
        for h in handles:
            h.remove()
        if was_enabled:
            model.enable_fast_path()
    names = [n for n, _ in encoder_units(model.encoder) + decoder_units(model.decoder)]
    units = _unit_ranges(max_abs, names)
    return {"max_abs": max_abs, "units": units, "fp32_units": tuple(n for n, v in units.items() if v > limit)}


def _unit_ranges(max_abs: dict[str, float], names: list[str]) -> dict[str, float]:
    """Per top-level unit, in execution order: max over its modules and over its input (the previous
    unit's output), since both are held in the unit's dtype. Stages are never called as modules (the
    coders loop over their blocks), so a stage's output is bounded by the max inside it; an empty stage
    passes its input through."""
    units, previous = {}, 0.0
    for unit in names:
        inside = max((v for n, v in max_abs.items() if n == unit or n.startswith(unit + ".")), default=0.0)
        units[unit] = max(inside, previous)
        previous = max_abs.get(unit, inside if inside > 0 else previous)
    return units


# ----------------------------------------------------------------------------- compile and CUDA graphs
def compile_dcae(
    model: nn.Module, mode: str | None = None, dynamic: bool | None = False, backend: str = "inductor"
) -> nn.Module:
    """channels-last + `torch.compile` on the encoder and decoder (in place; returns the model).

    The eager modules are compiled, not the fast path: Inductor fuses norms/activations itself, and
    the modules compile without graph breaks (checked with `torch._dynamo.explain` in the tests).
    `dynamic=False`: one specialised graph per input shape, the fastest for fixed-size benchmarks.
    """
    match_inductor_to_aten_isa()
    model.disable_fast_path()
    model.to(memory_format=torch.channels_last)
    model.encoder.compile(mode=mode, dynamic=dynamic, backend=backend)
    model.decoder.compile(mode=mode, dynamic=dynamic, backend=backend)
    return model


class CUDAGraphed:
    """`fn(x)` replayed from a CUDA graph, one capture per input shape/dtype/stride.

    Kernel launches cost ~5-10 us each; a small-batch DC-AE call launches a few thousand, so at 512 px
    batch 1 launch overhead is a visible share of the time. The output is a copy (the graph reuses its
    buffers); inputs are copied into a static buffer.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], warmup: int = 2) -> None:
        self.fn, self.warmup = fn, warmup
        self._graphs: dict[tuple, tuple] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.stride(), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(x)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: torch.Tensor) -> tuple:
        static_in = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuDNN autotuning, weight caches, Triton compilation
            for _ in range(self.warmup):
                self.fn(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(static_in)
        return graph, static_in, static_out


class GraphedDCAE:
    """encode/decode of an eval-mode DCAE through CUDA graphs (fixed shapes; see `CUDAGraphed`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.encode = CUDAGraphed(lambda x: model.encode(x))
        self.decode = CUDAGraphed(lambda z: model.decode(z))
