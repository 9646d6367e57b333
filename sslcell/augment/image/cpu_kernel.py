"""The whole augmentation of one crop in one compiled loop nest: the CPU executor of ``ImageAugment``.

:func:`augment_range` makes the crops ``a:z`` of a batch from parameters drawn beforehand (by
:mod:`sslcell.augment.image.config`, handed over as numpy arrays by
:mod:`sslcell.augment.image.execute`): the bilinear resampling (crop, flips, 90-degree turns,
rotation), per-channel gamma, contrast and brightness, blur and noise, each crop written once to
its row of the output and kept in cache (3 x 64 x 64 float32 is 48 KiB) while every op runs on
it. It is compiled by numba (on first use, cached on disk) with ``nogil``, so Python threads run
ranges of the batch in parallel; no numba threading layer is used (the workqueue layer is not
thread-safe, and the caller may be a DataLoader thread). The torch pipeline
(:mod:`sslcell.augment.image.torch_pipeline`) is its reference: same values from the same
parameters, up to float rounding.

Vectorisation notes (each measured on the 2-core CI machine):

* The gamma's power is a vectorisable ``exp2(g * log2(x))`` (:func:`_pow`): polynomial log2
  and exp2 on the float's exponent and mantissa (bit casts), within 1e-5 relative of ``x ** g``
  (float32 rounding of ``g * log2(x)`` for tiny ``x``; about 1e-7 for ``x`` near 1), instead of
  scalar libm calls that cost 5x the rest of the pipeline.
* Min and max run on order-preserving integer keys (:func:`_min_max`): LLVM vectorises integer
  min/max reductions but not float ones (5x).
* Indices are unsigned and shifted loops use slices: numba's negative-index check on a signed,
  computed index stops SIMD (16x on a shifted multiply-add).
* The blur is long contiguous loops over padded copies of the plane, 4 taps per pass
  (:func:`_filter`), not per-pixel reflection (about 2.5x).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# padding modes, as grid_sample's
ZEROS, BORDER, REFLECTION = 0, 1, 2
# resampling of a crop: per-pixel affine map, separable (rows then columns), transposed separable,
# or none (the crop is its image); the numbering of sslcell.augment.image.execute's resampling paths
GENERAL, UPRIGHT, TURNED, COPY = 0, 1, 2, 3

_JIT = dict(nogil=True, cache=True, fastmath={"nsz", "arcp", "contract", "reassoc"})


@intrinsic
def _as_int(typingctx, x):  # noqa: ANN001, ANN202 - numba intrinsic signature
    """The bits of a float32 as an int32 (no conversion)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _as_float(typingctx, x):  # noqa: ANN001, ANN202 - numba intrinsic signature
    """The low 32 bits of an integer as a float32 (no conversion)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        bits = args[0] if x.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(x), codegen


def _fit(function, degree: int) -> tuple[float, ...]:
    """Monomial coefficients (highest first) of a Chebyshev least-squares fit on [0, 1]."""
    nodes = (np.cos(np.pi * (np.arange(512) + 0.5) / 512) + 1) / 2
    chebyshev = np.polynomial.chebyshev.Chebyshev.fit(nodes, function(nodes), degree, domain=[0, 1])
    return tuple(float(c) for c in chebyshev.convert(kind=np.polynomial.Polynomial).coef[::-1])


# log2(1 + t) and 2 ** t for t in [0, 1]; max abs error about 3e-7 and 1e-8 in float64
_LOG2 = _fit(lambda t: np.log2(1 + t), 8)
_EXP2 = _fit(lambda t: np.exp2(t), 6)
L8, L7, L6, L5, L4, L3, L2, L1, L0 = (np.float32(c) for c in _LOG2)
E6, E5, E4, E3, E2, E1, E0 = (np.float32(c) for c in _EXP2)


@numba.njit(inline="always", **_JIT)
def _pow(x: np.float32, g: np.float32) -> np.float32:
    """``x ** g`` for ``x >= 0`` (``0 ** g = 0``) as ``exp2(g * log2(x))``, branch-free."""
    bits = _as_int(x)
    exponent = np.float32((bits >> 23) - 127)
    t = _as_float((bits & 0x007FFFFF) | 0x3F800000) - np.float32(1.0)
    log2 = ((((((((L8 * t + L7) * t + L6) * t + L5) * t + L4) * t + L3) * t + L2) * t + L1) * t
            + L0) + exponent
    y = max(g * log2, np.float32(-126.0))
    whole = np.floor(y)
    t = y - whole
    power = ((((((E6 * t + E5) * t + E4) * t + E3) * t + E2) * t + E1) * t + E0)
    power *= _as_float((np.int32(whole) + 127) << 23)
    return power if x > 0 else np.float32(0.0)


@numba.njit(inline="always", **_JIT)
def _pixel(coord: float, size: int, padding: int) -> float:
    """Normalised coordinate -> pixel coordinate, padded as ``grid_sample`` (align_corners=False):
    reflected about -0.5 and ``size - 0.5`` and clipped (reflection), clipped (border), or as is
    (zeros)."""
    span = float(size)
    pixel = (coord + 1.0) * (span / 2) - 0.5
    if padding == REFLECTION:
        shifted = abs(pixel + 0.5)
        flips = np.floor(shifted / span)
        extra = shifted - flips * span
        odd = flips - 2.0 * np.floor(flips * 0.5)
        pixel = (span - extra if odd > 0 else extra) - 0.5
    if padding != ZEROS:
        pixel = min(max(pixel, 0.0), span - 1.0)
    return pixel


@numba.njit(**_JIT)
def _linear_taps(coords: np.ndarray, size: int, padding: int, low: np.ndarray, high: np.ndarray,
                 weight_low: np.ndarray, weight_high: np.ndarray) -> None:
    """Bilinear taps along one axis for normalised ``coords`` (n,): the two pixels (clamped into
    ``[0, size)``) and their weights, 0 for a tap outside the image (zeros padding, or the upper
    tap at the last pixel). The pixels are unsigned (uint32), so indexing with them skips
    numba's negative-index check, which would stop SIMD."""
    if padding != ZEROS:  # pixel in [0, size - 1]: both taps inside but the last pixel's upper
        for k in range(coords.shape[0]):
            pixel = _pixel(coords[k], size, padding)
            floor = np.floor(pixel)
            frac = pixel - floor
            index = np.int32(floor)
            weight_low[k], weight_high[k] = 1.0 - frac, frac
            low[k], high[k] = index, min(index + 1, size - 1)
        return
    for k in range(coords.shape[0]):
        pixel = _pixel(coords[k], size, padding)
        floor = np.floor(pixel)
        frac = pixel - floor
        index = np.int32(floor)
        weight_low[k] = 1.0 - frac if 0 <= index < size else 0.0
        weight_high[k] = frac if -1 <= index < size - 1 else 0.0
        low[k] = min(max(index, 0), size - 1)
        high[k] = min(max(index + 1, 0), size - 1)


@numba.njit(**_JIT)
def _resample(image: np.ndarray, theta: np.ndarray, path: int, padding: int, scale: np.ndarray,
              bias: np.ndarray, out: np.ndarray) -> None:
    """Bilinear resampling of ``image`` (C, H, W), any real dtype, by ``theta`` (2, 3) into ``out``
    (C, h, w) float32, normalised on the way: ``scale[c] * x + bias[c]`` (C,) for every input
    value ``x`` (padding zeros stay 0 in normalised units).

    GENERAL: coordinates, taps and weights per output pixel, a row at a time, then the 4-tap
    gather per channel. UPRIGHT / TURNED (unrotated, inside the image): per output row, the 2-tap
    blend of two input rows (TURNED: columns) into a line, then 2-tap gathers from that line.
    """
    channels, height, width = image.shape
    out_h, out_w = out.shape[1], out.shape[2]
    if path == COPY:
        for c in range(channels):
            source, target = image[c].reshape(height * width), out[c].reshape(height * width)
            for k in range(height * width):
                target[k] = scale[c] * np.float32(source[k]) + bias[c]
        return
    us = (np.arange(out_w) * 2 + 1) / out_w - 1.0  # pixel centres, normalised (float64)
    vs = (np.arange(out_h) * 2 + 1) / out_h - 1.0
    theta = theta.astype(np.float64)
    flat = image.reshape(channels, height * width)
    if path == GENERAL:
        # the extreme coordinates are at the corner pixels: inside the image, no padding applies
        corner_x = (theta[0, 0] * us[0], theta[0, 0] * us[-1])
        corner_y = (theta[1, 0] * us[0], theta[1, 0] * us[-1])
        inside = True
        for v in (vs[0], vs[-1]):
            for a in corner_x:
                pixel = (a + theta[0, 1] * v + theta[0, 2] + 1.0) * (width / 2) - 0.5
                inside &= 0.0 <= pixel <= width - 1
            for a in corner_y:
                pixel = (a + theta[1, 1] * v + theta[1, 2] + 1.0) * (height / 2) - 0.5
                inside &= 0.0 <= pixel <= height - 1
        mode = BORDER if inside else padding  # (inside, every padding mode only clamps)
        xs, ys = np.empty(out_w, np.float64), np.empty(out_w, np.float64)
        x0, x1 = np.empty(out_w, np.uint32), np.empty(out_w, np.uint32)
        y0, y1 = np.empty(out_w, np.uint32), np.empty(out_w, np.uint32)
        wx0, wx1 = np.empty(out_w, np.float32), np.empty(out_w, np.float32)
        wy0, wy1 = np.empty(out_w, np.float32), np.empty(out_w, np.float32)
        i00, i01 = np.empty(out_w, np.uint32), np.empty(out_w, np.uint32)
        i10, i11 = np.empty(out_w, np.uint32), np.empty(out_w, np.uint32)
        w00, w01 = np.empty(out_w, np.float32), np.empty(out_w, np.float32)
        w10, w11 = np.empty(out_w, np.float32), np.empty(out_w, np.float32)
        total = np.empty(out_w, np.float32)
        for i in range(out_h):
            row_x = theta[0, 1] * vs[i] + theta[0, 2]
            row_y = theta[1, 1] * vs[i] + theta[1, 2]
            for j in range(out_w):
                xs[j] = theta[0, 0] * us[j] + row_x
                ys[j] = theta[1, 0] * us[j] + row_y
            _linear_taps(xs, width, mode, x0, x1, wx0, wx1)
            _linear_taps(ys, height, mode, y0, y1, wy0, wy1)
            for j in range(out_w):
                top, bottom = y0[j] * width, y1[j] * width
                i00[j], i01[j] = top + x0[j], top + x1[j]
                i10[j], i11[j] = bottom + x0[j], bottom + x1[j]
                w00[j], w01[j] = wy0[j] * wx0[j], wy0[j] * wx1[j]
                w10[j], w11[j] = wy1[j] * wx0[j], wy1[j] * wx1[j]
                total[j] = (w00[j] + w01[j]) + (w10[j] + w11[j])  # < 1 where zeros padding
            for c in range(channels):
                plane, row, a, b = flat[c], out[c, i], scale[c], bias[c]
                for j in range(out_w):
                    value = (w00[j] * np.float32(plane[i00[j]]) + w01[j] * np.float32(plane[i01[j]])
                             + w10[j] * np.float32(plane[i10[j]]) + w11[j] * np.float32(plane[i11[j]]))
                    row[j] = a * value + b * total[j]
        return
    # unrotated: the slow axis follows output rows, the fast one output columns
    if path == UPRIGHT:
        slow_coords = theta[1, 1] * vs + theta[1, 2]  # input row (normalised) per output row
        fast_coords = theta[0, 0] * us + theta[0, 2]  # input column per output column
        slow_size, fast_size = height, width
    else:
        slow_coords = theta[0, 1] * vs + theta[0, 2]  # input column per output row
        fast_coords = theta[1, 0] * us + theta[1, 2]  # input row per output column
        slow_size, fast_size = width, height
    s0, s1 = np.empty(out_h, np.uint32), np.empty(out_h, np.uint32)
    sw0, sw1 = np.empty(out_h, np.float32), np.empty(out_h, np.float32)
    f0, f1 = np.empty(out_w, np.uint32), np.empty(out_w, np.uint32)
    fw0, fw1 = np.empty(out_w, np.float32), np.empty(out_w, np.float32)
    _linear_taps(slow_coords, slow_size, padding, s0, s1, sw0, sw1)
    _linear_taps(fast_coords, fast_size, padding, f0, f1, fw0, fw1)
    line = np.empty(fast_size, np.float32)
    for c in range(channels):
        plane, offset = image[c], bias[c]
        for i in range(out_h):  # (the weights of a pixel sum to 1 here: the bias adds as is)
            a, b, w0, w1 = s0[i], s1[i], scale[c] * sw0[i], scale[c] * sw1[i]
            if path == UPRIGHT:
                top, bottom = plane[a], plane[b]
                for k in range(width):
                    line[k] = w0 * np.float32(top[k]) + w1 * np.float32(bottom[k]) + offset
            else:
                for k in range(height):
                    line[k] = w0 * np.float32(plane[k, a]) + w1 * np.float32(plane[k, b]) + offset
            row = out[c, i]
            for j in range(out_w):
                row[j] = fw0[j] * line[f0[j]] + fw1[j] * line[f1[j]]


@numba.njit(inline="always", **_JIT)
def _order_key(bits: int) -> int:
    """An int32 float's bits -> an integer that orders as the float does (and back: the same map)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@numba.njit(**_JIT)
def _min_max(values: np.ndarray) -> tuple[np.float32, np.float32]:
    """Min and max of float32 ``values`` (n > 0, no NaN), on order-preserving integer keys: LLVM
    vectorises integer min/max reductions, not float ones (5x faster here)."""
    lo, hi = _order_key(_as_int(values[0])), _order_key(_as_int(values[0]))
    for k in range(values.shape[0]):
        key = _order_key(_as_int(values[k]))
        lo, hi = min(lo, key), max(hi, key)
    return _as_float(_order_key(lo)), _as_float(_order_key(hi))


@numba.njit(**_JIT)
def _intensity(plane: np.ndarray, log_gamma: np.float32, factor: np.float32,
               shift: np.float32) -> None:
    """Gamma (on the plane rescaled by its min and max), contrast and brightness, in place on a
    flat (n,) plane: ``z = (x - lo) ** g``, ``y = span ** (1 - g) * z + lo``,
    ``out = factor * (y - mean(y)) + mean(y) + shift``."""
    n = plane.shape[0]
    lo, scale = np.float32(0.0), np.float32(1.0)
    if log_gamma != 0:
        lo, hi = _min_max(plane)
        g = np.float32(np.exp(log_gamma))
        span = hi - lo
        scale = np.float32(span ** (np.float32(1.0) - g)) if span > 0 else np.float32(1.0)
        for k in range(n):
            plane[k] = _pow(plane[k] - lo, g)
    offset = lo + shift
    if factor != 1:
        total = np.float32(0.0)
        for k in range(n):
            total += plane[k]
        offset += (np.float32(1.0) - factor) * scale * (total / np.float32(n))
        scale *= factor
    if scale != 1 or offset != 0:
        for k in range(n):
            plane[k] = scale * plane[k] + offset


@numba.njit(inline="always", **_JIT)
def _reflect(index: int, size: int) -> int:
    """``index`` in ``(-size, 2 * size - 1)`` reflected into ``[0, size)`` as ``F.pad`` "reflect"."""
    index = abs(index)
    return 2 * (size - 1) - index if index > size - 1 else index


@numba.njit(**_JIT)
def blur_scratch_size(height: int, width: int, taps: int) -> int:
    """Floats of scratch that :func:`_blur` needs for (h, w) crops and ``taps`` (a multiple of 4)."""
    return (height + taps) * width + 2 * height * (width + taps) + height * width


@numba.njit(inline="always", **_JIT)
def _filter(source: np.ndarray, kernel: np.ndarray, stride: int, out: np.ndarray) -> None:
    """``out[m] = sum_k kernel[k] * source[m + k * stride]`` for ``m < len(out)``, 4 taps per pass
    over ``out`` (``len(kernel)`` a multiple of 4; slices, so no negative-index checks)."""
    n = out.shape[0]
    for m in range(n):
        out[m] = np.float32(0.0)
    for k in range(0, kernel.shape[0], 4):
        w0, w1, w2, w3 = kernel[k], kernel[k + 1], kernel[k + 2], kernel[k + 3]
        s0 = source[k * stride: k * stride + n]
        s1 = source[(k + 1) * stride: (k + 1) * stride + n]
        s2 = source[(k + 2) * stride: (k + 2) * stride + n]
        s3 = source[(k + 3) * stride: (k + 3) * stride + n]
        for m in range(n):
            out[m] += w0 * s0[m] + w1 * s1[m] + w2 * s2[m] + w3 * s3[m]


@numba.njit(**_JIT)
def _blur(crop: np.ndarray, kernel: np.ndarray, radius: int, scratch: np.ndarray) -> None:
    """Separable gaussian with reflect padding, in place on ``crop`` (C, h, w): ``kernel`` holds the
    2r + 1 weights, then zeros up to a multiple of 4 taps.

    Per channel: the plane is copied with ``r`` reflected rows above and below (and zero rows
    for the padding taps), the columns are filtered by long loops over that flat copy
    (:func:`_filter`), the result is copied with ``r`` reflected columns left and right of every
    row, and the rows are filtered the same way; long contiguous loops vectorise, per-pixel
    reflection did not. ``scratch``: see :func:`blur_scratch_size`.
    """
    channels, height, width = crop.shape
    taps, n = kernel.shape[0], height * width
    wide = width + taps - 1  # a row with its reflected columns, and room for the padding taps
    tall = scratch[: (height + taps) * width]
    padded = scratch[tall.shape[0]: tall.shape[0] + height * wide]
    vertical = scratch[tall.shape[0] + padded.shape[0]: tall.shape[0] + padded.shape[0] + n]
    rows = scratch[tall.shape[0] + padded.shape[0] + n: tall.shape[0] + 2 * padded.shape[0] + n]
    for m in range((height + 2 * radius) * width, tall.shape[0]):  # read by the zero taps only
        tall[m] = np.float32(0.0)
    for c in range(channels):
        plane = crop[c]
        for i in range(height + 2 * radius):
            source, target = plane[_reflect(i - radius, height)], tall[i * width: (i + 1) * width]
            for j in range(width):
                target[j] = source[j]
        _filter(tall, kernel, width, vertical)
        for i in range(height):
            source, target = vertical[i * width: (i + 1) * width], padded[i * wide: (i + 1) * wide]
            for j in range(width):
                target[radius + j] = source[j]
            for m in range(1, radius + 1):
                target[radius - m] = source[m]
                target[radius + width - 1 + m] = source[width - 1 - m]
            for m in range(width + 2 * radius, wide):
                target[m] = np.float32(0.0)
        # rows: position i * wide + j of `padded` starts the taps of pixel (i, j)
        _filter(padded, kernel, 1, rows[: (height - 1) * wide + width])
        for i in range(height):
            source, target = rows[i * wide: i * wide + width], plane[i]
            for j in range(width):
                target[j] = source[j]


@numba.njit(**_JIT)
def augment_range(images: np.ndarray, scale: np.ndarray, bias: np.ndarray, sources: np.ndarray,
                  theta: np.ndarray, paths: np.ndarray, padding: int, log_gamma: np.ndarray,
                  factor: np.ndarray, shift: np.ndarray, kernels: np.ndarray, radius: int,
                  blurred: np.ndarray, noise_std: np.ndarray, noise_offset: np.ndarray, bank: np.ndarray,
                  out: np.ndarray, start: int, stop: int) -> None:
    """Make crops ``start:stop`` of ``out`` (B, C, h, w) float32 from ``images`` (N, C, H, W).

    ``images`` may be float32, uint8 or uint16 (compiled for each): they are normalised while
    resampled, ``scale[c] * x + bias[c]`` (C,) float32. Per crop ``b``: resample
    ``images[sources[b]]`` by ``theta[b]`` (2, 3) on ``paths[b]`` with ``padding``; per channel,
    gamma ``exp(log_gamma[b, c])`` (0: none), contrast ``factor[b, c]`` and brightness
    ``shift[b, c]``; if ``blurred[b]``, the gaussian ``kernels[b]`` of ``radius`` (2r + 1
    weights, then zeros up to a multiple of 4); then
    ``noise_std[b] * bank[noise_offset[b]:][:C * h * w]`` (std 0: none).
    """
    channels, out_h, out_w = out.shape[1], out.shape[2], out.shape[3]
    size = out_h * out_w
    scratch = np.empty(blur_scratch_size(out_h, out_w, kernels.shape[1]), np.float32)
    for b in range(start, stop):
        crop = out[b]
        _resample(images[sources[b]], theta[b], paths[b], padding, scale, bias, crop)
        flat = crop.reshape(channels, size)
        for c in range(channels):
            _intensity(flat[c], log_gamma[b, c], factor[b, c], shift[b, c])
        if blurred[b]:
            _blur(crop, kernels[b], radius, scratch)
        std = noise_std[b]
        if std != 0:
            noise = bank[noise_offset[b]: noise_offset[b] + channels * size]
            values = crop.reshape(channels * size)
            for k in range(channels * size):
                values[k] += std * noise[k]
