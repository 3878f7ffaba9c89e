"""The DC-AE autoencoder: encoder, decoder and the user-facing `DCAE` model.

Read top-down: Encoder (stem -> stages -> bottleneck with residual shortcut), Decoder (mirror), DCAE
(encode/decode for images of any size, latent scaling, batch slicing, loading and saving).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dcae.errors import NonFiniteError, NonFiniteWarning
from dcae.models import memory, weights
from dcae.models.config import DCAEConfig, get_config
from dcae.models.fast import FastOptions, FastPath
from dcae.models.finite import non_finite_items, warn_non_finite_weights
from dcae.models.layers import (
    ChannelDuplicatingPixelShuffle,
    ConvLayer,
    OpSequential,
    PixelUnshuffleChannelAveraging,
    PlainBlock,
    ResidualBlock,
    SliceableInputConv,
    SliceableOutputConv,
    build_act,
    build_block,
    build_downsample,
    build_norm,
    build_upsample,
    downsample_block,
    upsample_block,
)
from dcae.models.tiling import DEFAULT_OVERLAP, Tiler, TilingConfig


def _leading_empty_stages(depths: tuple[int, ...]) -> int:
    """Stages of depth 0 at the start fold into the stem/head: each one is a x2 (un)shuffle there."""
    n = 0
    while depths[n] == 0:
        n += 1
    return n


@contextlib.contextmanager
def _batchnorm_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of `module` normalise with batch statistics but leave their running statistics
    alone. Used while gradient checkpointing recomputes a block in backward, so that one training
    step updates the statistics once, as without checkpointing."""
    bns = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class _Coder(nn.Module):
    """Shared bits of Encoder and Decoder: running stages, with optional gradient checkpointing."""

    gradient_checkpointing: bool = False

    def _run(self, stage: OpSequential, x: torch.Tensor) -> torch.Tensor:
        for block in stage.op_list:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                contexts = partial(lambda b: (contextlib.nullcontext(), _batchnorm_stats_frozen(b)), block)
                x = checkpoint(block, x, use_reentrant=False, context_fn=contexts)
            else:
                x = block(x)
        return x


class Encoder(_Coder):
    def __init__(self, cfg: DCAEConfig) -> None:
        super().__init__()
        widths, depths = cfg.encoder_widths, cfg.encoder_depths
        start = _leading_empty_stages(depths)
        if start == 0:
            self.project_in = ConvLayer(cfg.in_channels, widths[0], 3)
        else:
            self.project_in = build_downsample(cfg.encoder_downsample, cfg.in_channels, widths[start], 2**start)

        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            ops: list[nn.Module] = [
                build_block(
                    cfg.encoder_block_types[i],
                    width,
                    cfg.encoder_norm,
                    cfg.encoder_act,
                    cfg.attention_head_dim,
                    cfg.evit_local_norm,
                )
                for _ in range(depth)
            ]
            if i < len(widths) - 1 and depth > 0:
                ops.append(
                    downsample_block(cfg.encoder_downsample, width, widths[i + 1], cfg.encoder_downsample_shortcut)
                )
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)

        out_conv = (
            SliceableOutputConv(widths[-1], cfg.latent_channels)
            if cfg.encoder_sliceable_out
            else ConvLayer(widths[-1], cfg.latent_channels, 3)
        )
        self.project_out: nn.Module = OpSequential([out_conv])
        if cfg.encoder_out_shortcut:
            # Bottleneck residual: latent = conv(h) + mean over groups of consecutive channels of h.
            self.project_out = ResidualBlock(
                self.project_out, PixelUnshuffleChannelAveraging(widths[-1], cfg.latent_channels, 1)
            )
        elif not cfg.encoder_sliceable_out:  # shortcut off, keys kept (`main.`); DC-AE 1.5 has its released layout
            self.project_out = PlainBlock(self.project_out)

    def forward(self, x: torch.Tensor, latent_channels: int | None = None) -> torch.Tensor:
        x = self.project_in(x)
        for stage in self.stages:
            x = self._run(stage, x)
        if latent_channels is not None:
            return self.sliceable_out(latent_channels)(x, out_channels=latent_channels)
        return self.project_out(x)

    def sliceable_out(self, latent_channels: int) -> SliceableOutputConv:
        """The output conv of a structured latent (DC-AE 1.5), of which the first `latent_channels` outputs
        form a latent on their own; a clear error for other models. The full output sliced to those
        channels is the same latent (the conv's output channels are independent)."""
        head = self.project_out.op_list[0] if isinstance(self.project_out, OpSequential) else None
        if not isinstance(head, SliceableOutputConv):
            raise ValueError("latent_channels needs a model with a channel-sliceable latent (DC-AE 1.5)")
        if not 1 <= latent_channels <= head.conv.out_channels:
            raise ValueError(f"latent_channels must be 1..{head.conv.out_channels}, got {latent_channels}")
        return head


class Decoder(_Coder):
    def __init__(self, cfg: DCAEConfig) -> None:
        super().__init__()
        widths, depths = cfg.decoder_widths, cfg.decoder_depths
        n = len(widths)

        in_conv = (
            SliceableInputConv(cfg.latent_channels, widths[-1])
            if cfg.decoder_sliceable_in
            else ConvLayer(cfg.latent_channels, widths[-1], 3)
        )
        self.project_in: nn.Module = in_conv
        if cfg.decoder_in_shortcut:
            # Bottleneck residual: h = conv(z) + z with each channel repeated width/latent times.
            self.project_in = ResidualBlock(in_conv, ChannelDuplicatingPixelShuffle(cfg.latent_channels, widths[-1], 1))
        elif not cfg.decoder_sliceable_in:  # as in the encoder
            self.project_in = PlainBlock(in_conv)

        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            ops: list[nn.Module] = []
            if i < n - 1 and depth > 0:
                ops.append(upsample_block(cfg.decoder_upsample, widths[i + 1], width, cfg.decoder_upsample_shortcut))
            norm, act = cfg.decoder_norms[i], cfg.decoder_acts[i]
            ops += [
                build_block(cfg.decoder_block_types[i], width, norm, act, cfg.attention_head_dim, cfg.evit_local_norm)
                for _ in range(depth)
            ]
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)  # stages[i] is stage i; they run from the last to the first

        # The head: norm -> act -> conv (or a x2^k pixel-shuffle conv when the first stages are empty).
        start = _leading_empty_stages(depths)
        width = widths[start]
        head_conv = (
            ConvLayer(width, cfg.in_channels, 3)
            if start == 0
            else build_upsample(cfg.decoder_upsample, width, cfg.in_channels, 2**start)
        )
        self.project_out = OpSequential(
            [build_norm(cfg.decoder_head_norm, width), build_act(cfg.decoder_head_act), head_conv]
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project_in(z)
        for stage in reversed(self.stages):
            x = self._run(stage, x)
        return self.project_out(x)


class FastPathFallbackWarning(RuntimeWarning):
    """The fast inference path failed and the eager modules answered instead (see `DCAE._run`)."""


def _warn_at_caller(message: Warning | str) -> None:
    """warnings.warn attributed to the first frame outside this module: the code that called encode/decode,
    however deep the dispatch below it went (Python 3.12's `skip_file_prefixes`, by hand)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


class DCAE(nn.Module):
    """Deep Compression Autoencoder. Images in [-1, 1] <-> latents (unscaled; see `scale_latents`)."""

    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # How encode/decode run (see `_run`); plain attributes, set them directly or with the methods named.
        # The fast inference kernels (dcae.models.fast; `enable_fast_path`). They only run in eval mode without
        # autograd, so training and gradient-based uses always see the eager modules.
        self.fast_path_enabled: bool = True
        # The `Tiler` of `enable_tiling`, or None: inputs larger than its tile run in tiles.
        self.tiling: Tiler | None = None
        # An untiled call that runs out of accelerator memory is retried once in exact tiles (the same result
        # up to rounding), with a warning, instead of failing: a 4K decode then just works. False: the error.
        self.tile_on_oom: bool = True
        # A CPU process that runs out of memory is killed, not told: so on the CPU (and with tile_on_oom),
        # inputs of more than this many pixels get their untiled peak memory estimated first (once per shape;
        # see dcae.models.memory) and run in exact tiles when it exceeds about half the free memory.
        self.ram_check_pixels: int = 1536 * 1536
        # What encode/decode do when their output holds NaN or Inf: "warn" (NonFiniteWarning naming the batch
        # items), "error" (NonFiniteError) or "off" (no check; saves one pass over the output).
        self.finite_check: str = "warn"
        self._fast: FastPath | None = None  # the fast path and its weight caches, made on first use
        self._peak_estimates: dict[tuple, int] = {}  # (kind, shape, dtype) -> untiled peak bytes (ram check)

    def __setstate__(self, state: dict) -> None:
        # Whole-model pickles from before these settings were set in __init__ (their defaults were class
        # attributes) may lack them, and hold the tiler as "_tiler".
        super().__setstate__(state)
        tiling = self.__dict__.pop("_tiler", None)
        defaults = {
            "fast_path_enabled": True,
            "tiling": tiling,
            "tile_on_oom": True,
            "ram_check_pixels": 1536 * 1536,
            "finite_check": "warn",
            "_fast": None,
            "_peak_estimates": {},
        }
        for name, value in defaults.items():
            self.__dict__.setdefault(name, value)

    # --------------------------------------------------------------------- construction and I/O
    @classmethod
    def from_config(cls, config: str | DCAEConfig | os.PathLike) -> DCAE:
        """Randomly initialised model from a zoo name, a DCAEConfig or a YAML/JSON config file."""
        if isinstance(config, DCAEConfig):
            return cls(config)
        if isinstance(config, os.PathLike) or str(config).endswith((".yaml", ".yml", ".json")):
            return cls(DCAEConfig.from_file(config))
        return cls(get_config(str(config)))

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, **kwargs) -> DCAE:
        """Load released or saved weights: a Hub id, a local folder (original or diffusers format,
        sharded or not) or a single .safetensors/.pt file. Keyword arguments: see `dcae.models.weights.load`."""
        model = weights.load(DCAE, source, **kwargs)
        model.check_weights_finite(str(source))
        return model

    def check_weights_finite(self, source: str = "weights") -> bool:
        """Warn (NonFiniteWarning) naming the first parameter or buffer that holds NaN/Inf; such weights
        make every output NaN. One pass over the weights; True when all are finite."""
        return warn_non_finite_weights(self.state_dict(), source, stacklevel=3)  # from_pretrained's caller

    def save_pretrained(self, directory: str | os.PathLike, format: str = "original", overwrite: bool = False) -> Path:
        """Write `directory` in the original (`model.safetensors` + config.json) or diffusers format."""
        return weights.save(self, directory, format=format, overwrite=overwrite)

    # --------------------------------------------------------------------- properties
    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    # --------------------------------------------------------------------- encode / decode
    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as a diffusion model sees them: z * scaling_factor (unit RMS, no shift)."""
        return z * self.config.scaling_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.config.scaling_factor

    def pad_to_multiple(self, x: torch.Tensor) -> torch.Tensor:
        """Pad H and W up to a multiple of the compression factor (reflect where possible, else replicate)."""
        f = self.spatial_compression
        h, w = x.shape[-2:]
        ph, pw = (-h) % f, (-w) % f
        if ph == 0 and pw == 0:
            return x
        mode = "reflect" if ph < h and pw < w else "replicate"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def encode(
        self,
        x: torch.Tensor,
        latent_channels: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, C, ceil(H/f), ceil(W/f)).

        Sizes that are not a multiple of f are padded (`decode(encode(x))[..., :H, :W]` crops back;
        `reconstruct` does both). `batch_size` splits the batch to bound memory. For DC-AE 1.5,
        `latent_channels=k` returns only the first k channels of the structured latent.
        """
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images of shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        x = self.pad_to_multiple(x.to(self._param_dtype()))
        if latent_channels is not None:
            self.encoder.sliceable_out(latent_channels)  # a clear error for other models and bad counts
        z = self._run("encode", x, batch_size)
        if latent_channels is not None:  # DC-AE 1.5: the first k channels of the full latent, on every path
            z = z[:, :latent_channels].contiguous()
        return self._check_output(z, "latents")

    def decode(self, z: torch.Tensor, batch_size: int | None = None, check_finite: bool = False) -> torch.Tensor:
        """Latents (unscaled) -> images in [-1, 1] (not clamped: clamp when converting to pixels)."""
        if z.ndim != 4:
            raise ValueError(f"expected latents of shape (B, C, h, w), got {tuple(z.shape)}")
        c, full, sliceable = z.shape[1], self.latent_channels, self.config.decoder_sliceable_in
        if not (c == full or (sliceable and 1 <= c <= full)):
            accepted = f"1 to {full} (its first channels)" if sliceable else str(full)
            raise ValueError(f"the latents have {c} channels; {self.config.name} decodes {accepted}")
        if check_finite and not torch.isfinite(z).all():
            raise NonFiniteError("latents contain NaN or Inf values; they cannot be decoded")
        return self._check_output(self._run("decode", z.to(self._param_dtype()), batch_size), "images")

    def reconstruct(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """decode(encode(x)) cropped back to the input size."""
        h, w = x.shape[-2:]
        return self.decode(self.encode(x, batch_size=batch_size), batch_size=batch_size)[..., :h, :w]

    def forward(self, x: torch.Tensor, latent_channels: int | None = None) -> torch.Tensor:
        """Reconstruction for training; DC-AE 1.5: through the first `latent_channels` latent channels only."""
        return self.decoder(self.encoder(x, latent_channels=latent_channels))

    # --------------------------------------------------------------------- how encode/decode run
    def _run(self, kind: str, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Encode or decode (`kind`) a batch: the one place that decides how it runs.

        1. batches larger than `batch_size` run one chunk of batch_size at a time;
        2. in tiles when tiling is on and x is larger than a tile, or, on the CPU, when the untiled call would
           not fit in the free memory (`_exceeds_ram`; exact tiles, with a warning);
        3. else untiled: the fast path in eval mode without autograd (`_fast_path`), else the eager modules;
        4. if the untiled call runs out of accelerator memory (`tile_on_oom`, no autograd): once more in exact
           tiles, with a warning;
        5. if any of that fails on the fast path with an error other than out-of-memory, the eager modules
           answer (steps 2-4 once more) and the fast path is switched off, with a warning: the fast path has
           kernels and layouts the eager modules do not (a driver or library the project never met), and may
           cost speed, never a result. If the eager modules fail too, their error is raised and the fast path
           stays on (the input is at fault, not the fast path).
        """
        if batch_size is not None and x.shape[0] > batch_size:
            return torch.cat([self._run(kind, chunk) for chunk in x.split(batch_size)])
        on_fast_path = self._fast_path() is not None
        try:
            if self.tiling is not None and self.tiling.wants(kind, x):
                return self.tiling.run(kind, self, x)
            if self._exceeds_ram(kind, x):
                return Tiler(self.spatial_compression).run(kind, self, x)
            try:
                return self._encode_once(x) if kind == "encode" else self._decode_once(x)
            except torch.OutOfMemoryError as exc:
                if not self.tile_on_oom or torch.is_grad_enabled():
                    raise
                oom = str(exc).split("\n")[0]  # the message only: the traceback keeps the failed call's tensors
            return self._tiled_after_oom(kind, x, oom)
        except RuntimeError as exc:
            if not on_fast_path or isinstance(exc, torch.OutOfMemoryError):
                raise
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.fast_path_enabled = False
        try:
            out = self._run(kind, x)
        except BaseException:
            self.fast_path_enabled = True
            raise
        self._fast = None  # frees its weight caches
        _warn_at_caller(
            FastPathFallbackWarning(
                f"the fast inference path failed ({failure}) where the eager modules work; it is off for this "
                "model now (enable_fast_path() turns it back on). Please report this with your GPU and versions."
            )
        )
        return out

    def _exceeds_ram(self, kind: str, x: torch.Tensor) -> bool:
        """True (with a warning) when an untiled CPU call would need more than ~half the free memory."""
        if x.device.type != "cpu" or not self.tile_on_oom or torch.is_grad_enabled():
            return False
        pixels = x.shape[-2] * x.shape[-1] * (self.spatial_compression**2 if kind == "decode" else 1)
        if pixels * x.shape[0] <= self.ram_check_pixels:
            return False
        free = memory.available_ram_bytes()
        if free is None:
            return False
        key = (kind, tuple(x.shape), x.dtype)
        if key not in self._peak_estimates:
            try:
                self._peak_estimates[key] = memory.estimate_peak_bytes(self, kind, tuple(x.shape), x.dtype)
            except Exception:  # an op the meta device cannot trace: no estimate, so no reason to tile
                self._peak_estimates[key] = 0
        need = self._peak_estimates[key]
        # 2x: allocator slack, backend scratch and the fast path's caches are not in the estimate.
        if 2 * need <= free:
            return False
        _warn_at_caller(
            f"{kind} of {tuple(x.shape)} needs about {need / 2**30:.1f} GiB untiled, {free / 2**30:.1f} GiB are "
            "free: running in exact tiles (same result). enable_tiling() does this from the start."
        )
        return True

    def _tiled_after_oom(self, kind: str, x: torch.Tensor, oom: str) -> torch.Tensor:
        """The retry of an untiled call that ran out of accelerator memory (message `oom`), in tiles."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        tiler = self.tiling or Tiler(self.spatial_compression)
        _warn_at_caller(
            f"out of memory on input {tuple(x.shape)} ({oom}); retrying in tiles ({tiler}). Call "
            "enable_tiling() to tile from the start, or set tile_on_oom = False to get the error instead."
        )
        try:
            return tiler.run(kind, self, x)
        except torch.OutOfMemoryError:
            raise torch.OutOfMemoryError(
                f"out of memory on input {tuple(x.shape)}, also in tiles ({tiler}): use a smaller batch_size "
                "or enable_tiling(tile_size=512)"
            ) from None

    def _fast_path(self) -> FastPath | None:
        """The fast path when it applies (enabled, eval mode, no autograd), made on first use; else None."""
        if not self.fast_path_enabled or self.training or torch.is_grad_enabled():
            return None
        if self._fast is None:
            self._fast = FastPath()
        return self._fast

    # One untiled model call each (the blend tiler calls these per batch of tiles).
    def _encode_once(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast_path()
        return fast.encode(self.encoder, x) if fast is not None else self.encoder(x)

    def _decode_once(self, z: torch.Tensor) -> torch.Tensor:
        fast = self._fast_path()
        return fast.decode(self.decoder, z) if fast is not None else self.decoder(z)

    def _check_output(self, out: torch.Tensor, what: str) -> torch.Tensor:
        # Nothing to read on the meta device, and no host sync while a CUDA graph is captured or dynamo traces.
        if self.finite_check == "off" or out.device.type == "meta" or torch.compiler.is_compiling():
            return out
        if out.is_cuda and torch.cuda.is_current_stream_capturing():
            return out
        bad = non_finite_items(out)
        if bad:
            message = f"{self.config.name}: NaN/Inf in the {what} of batch item(s) {bad} of {out.shape[0]}"
            if self.finite_check == "error":
                raise NonFiniteError(message)
            warnings.warn(NonFiniteWarning(message), stacklevel=3)
        return out

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # --------------------------------------------------------------------- fast path and tiling
    def enable_fast_path(self, enabled: bool = True, **options) -> None:
        """Use the fast inference kernels (options: see `dcae.models.fast.FastOptions`)."""
        self.fast_path_enabled = enabled
        self._fast = FastPath(FastOptions(**options)) if enabled else None

    def disable_fast_path(self) -> None:
        """Run the eager modules only (the reference numerics)."""
        self.enable_fast_path(False)

    def enable_tiling(
        self,
        tile_size: int | None = None,
        overlap: int | None = None,
        max_batch_pixels: int | None = None,
        mode: str = "exact",
    ) -> None:
        """Encode/decode images larger than `tile_size` px in tiles, seamlessly (see `dcae.models.tiling`).

        mode "exact" (default): the attention stages run on the whole (low-resolution) image and the
        local high-resolution stages run tile by tile with enough context to give the untiled result.
        mode "blend": whole-model tiles overlapping by `overlap` px, blended with smooth ramps (for
        images whose 1/8-resolution features do not fit). Sizes are in image pixels, rounded up to
        multiples of the compression factor; max_batch_pixels bounds the tiles per model call.
        """
        d = TilingConfig()
        tile = tile_size or d.tile_size
        if overlap is None:  # the default overlap, but at most a quarter of a smaller tile
            overlap = min(DEFAULT_OVERLAP, max(tile // 4, self.spatial_compression))
            overlap = 0 if overlap >= tile else overlap
        cfg = TilingConfig(tile, overlap, max_batch_pixels or d.max_batch_pixels, mode)
        self.tiling = Tiler(self.spatial_compression, cfg)

    def disable_tiling(self) -> None:
        self.tiling = None

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}, f{self.spatial_compression}c{self.latent_channels}"
