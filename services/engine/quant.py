"""Weight precision as a module swap (gpt-fast style): `apply_weight_dtype` replaces a loaded model's
`nn.Linear` (and, for bfloat16, `nn.Embedding`) modules in place; the model file never branches on dtype.
float32 is swapped too: `Float32Linear` runs specserve's own batch-invariant kernel
(kernels/csrc/linear_cpu.cpp), as fast as MKL's GEMV at M=1 and faster than oneDNN at the small M of
decoding; where the C++ kernels did not build, `PackedLinear` holds the weight in oneDNN's blocked layout.
Activations stay float32 between modules in every mode, so RMSNorm, RoPE, attention and the KV cache
are untouched.

Batch invariance — does a row's output change with the other rows of the call? Measured on this x86
CPU (AMX) with torch 2.13, for the 135M model's shapes and M = 1..512:
  * fp32 `F.linear`: NOT invariant. M=1 (GEMV) differs from every M>1, and M>1 sizes differ among
    themselves, in the last bits.
  * bf16 `F.linear`: invariant for most shapes, but not all (the 49152-row head at M=64/128, the
    gate/up projection at M=512) — not something to rely on.
  * oneDNN's prepacked linear (AMD EPYC Zen 4, M = 1..512): float32 and bfloat16 both invariant for
    every M >= 2, but M=1 differs from M>=2 for the down projection (K=1536). `PackedLinear` therefore
    pads fewer than MIN_ROWS rows up to MIN_ROWS, which makes it invariant at every M (and faster).
    On an Intel Xeon with AMX (bf16/int8 tiles), float32 is invariant at every M = 1..300 too, and
    bfloat16 at every M <= 32 (padded as above), but some larger M take another kernel (every M >= 33
    for the LM head; M = 33, 65, 76, ... for the down projection), with other sums. bfloat16 calls are
    therefore cut into pieces of at most BF16_MAX_ROWS rows.
  * `Float32Linear`: invariant by construction, at every M, thread count and CPU (one fixed summation
    order per output element; kernels/linear.py reproduces its bits in torch).
  * `Int8Linear`: invariant at every M tried (1..2048) and across thread counts: integer accumulation
    is exact and its float epilogue is per element. tests/unit/engine/test_quant.py checks it. Smoothing
    (engine/smoothing.py) changes only the weights, so it keeps this.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from specserve.engine.model import Attention, LlamaModel
from specserve.engine.smoothing import DEFAULT_ALPHA, collect_input_absmax, smooth_
from specserve.kernels import cpu_ops
from specserve.kernels.linear import INT8_MAX as _INT8_MAX, exact_int_matmul, pack_int8_weight, quantize_rows_ref
from specserve.errors import InvalidRequestError


def can_pack(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's prepacked CPU linear is in this torch build (it is in the pinned CPU wheel) and, for
    bfloat16, runs on this CPU: it needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, which AVX2-only CPUs lack."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def rounded_prefill_attention() -> bool:
    """Whether models with rounded (bfloat16, int8) weights attend long prefill chunks in bfloat16 here."""
    return can_pack(torch.bfloat16) and cpu_ops.has_cpu_flag("amx_bf16")


def has_bfloat16_linear() -> bool:
    """Whether `decode_linear(..., torch.bfloat16)` has a fast kernel here (oneDNN's or specserve's)."""
    return can_pack(torch.bfloat16) or cpu_ops.load()


# All 121 linears of the 135M model, median ms on AMD EPYC (Zen 4, 2 cores) by M = 1 / 2 / 3 / 4 / 5 / 6 / 8:
# float32 32.0 / 34.0 / 29.1 / 27.3 / 26.6 / 27.2 / 30.3, bfloat16 18.8 / 20.1 / 17.2 / 16.1 / 16.9 / 16.7 / 19.0.
# oneDNN's kernels for 4-6 rows beat its 1-row and 2-row ones, so short inputs are padded to 4 rows.
MIN_ROWS = 4
BF16_MAX_ROWS = 32  # the largest M whose bfloat16 kernel matches every smaller M's on an AMX Xeon (see above)


class PackedLinear(nn.Module):
    """float32 or bfloat16 weights prepacked once into oneDNN's blocked layout; float32 in and out.

    All 121 linears of the 135M model, one forward, AMD EPYC (Zen 4, 2 cores), ms at M = 1 / 8 / 16:
    float32 `F.linear` 49.6 / 61.2 / 83.7, packed 26.2 / 26.1 / 33.2; bfloat16 `F.linear` 19.8 / 25.2 /
    30.8, packed 14.0 / 15.3 / 20.0. MKL's GEMV reads a row-major [out, in] weight at about half the
    memory bandwidth; oneDNN's layout reaches ~20 GB/s, and M=8 costs no more than M=1.
    float32 accumulates in float32 (max error vs float64 ~2x `F.linear`'s, both at rounding level).
    Batch-invariant on the machines measured (module docstring), with short inputs padded to MIN_ROWS and
    bfloat16 inputs cut into pieces of at most BF16_MAX_ROWS rows.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.out_features, self.in_features = weight.shape
        # An opaque oneDNN tensor, not a Parameter: kept out of state_dict like Int8Linear's packed weight.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), None)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] float32 -> [..., out] float32
        rows = x.reshape(-1, self.in_features).to(self.dtype)  # [M, in]
        if self.dtype == torch.bfloat16 and len(rows) > BF16_MAX_ROWS:
            out = torch.cat([self._linear(piece) for piece in rows.split(BF16_MAX_ROWS)])
        else:
            out = self._linear(rows)
        return out.float().view(*x.shape[:-1], self.out_features)

    def _linear(self, rows: torch.Tensor) -> torch.Tensor:  # [M, in] self.dtype -> [M, out] self.dtype
        num_rows = rows.shape[0]
        if 0 < num_rows < MIN_ROWS:  # copies of the last row; a contiguous input (an expanded one is slow)
            rows = torch.cat([rows, rows[-1:].expand(MIN_ROWS - num_rows, -1)])
        return torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")[:num_rows]

    def fused_operands(self) -> list[torch.Tensor] | None:
        """What `specserve_cpu::decoder_layers` needs to run this linear (engine/model.py), or None: bfloat16
        only (a float32 PackedLinear means the C++ kernels did not build)."""
        return [self.packed_weight] if self.dtype == torch.bfloat16 and self.bias is None else None


class Float32Linear(nn.Module):
    """float32 arithmetic on float32 weights as loaded (row-major, sharing the loaded tensor, so a tied head
    adds no copy of the embedding table) or on bfloat16 ones, multiplied by the batch-invariant C++ kernel
    (a bfloat16 weight is widened to float32 in registers: the bits of the float32 kernel on the widened
    weight, half the bytes streamed); `F.linear` where the kernels did not build (`apply_weight_dtype`
    then picks `PackedLinear` instead) or for another device or dtype."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, weight_dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        assert weight_dtype in (torch.float32, torch.bfloat16), "float32 or bfloat16 weights"
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().to(weight_dtype).contiguous(), requires_grad=False)  # [out, in]
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)  # [out]

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype, as `PackedLinear.dtype` (the other linear `decode_linear` picks)."""
        return self.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] float32 -> [..., out] float32
        rows = x.reshape(-1, self.in_features)  # [M, in]
        if cpu_ops.applies(rows):
            out = torch.ops.specserve_cpu.linear(rows.contiguous(), self.weight, self.bias)
        else:
            out = F.linear(rows, self.weight.to(rows.dtype), self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def fused_operands(self) -> list[torch.Tensor] | None:
        """What `specserve_cpu::decoder_layers` needs to run this linear (engine/model.py), or None."""
        return [self.weight] if self.bias is None and cpu_ops.load() else None


def decode_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """The fastest batch-invariant linear for `dtype` (float32 or bfloat16 weights) on this machine: float32
    in specserve's kernel when it built, else oneDNN's prepacked one; bfloat16 in oneDNN's prepacked one
    where this CPU has it (AMX makes it the fastest at prefill), else specserve's kernel reading bfloat16,
    else `BF16Linear`."""
    if dtype == torch.float32:
        return Float32Linear(weight, bias) if cpu_ops.load() else PackedLinear(weight, bias, dtype)
    if can_pack(dtype):
        return PackedLinear(weight, bias, dtype)
    if cpu_ops.load():
        return Float32Linear(weight, bias, dtype)
    weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)  # a bfloat16 source keeps its storage
    bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return BF16Linear(weight, bias)


class BF16Linear(nn.Module):
    """bf16 weights; casts the input to bf16 and the output back to float32, so the model stays fp32.

    On the 135M model's linears the two casts cost ~7% over a whole-bf16 model at M <= 16 and ~40% at
    M=256: the price of keeping norms, RoPE and the KV cache in float32 without touching the model file.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.weight = weight  # [out, in] bf16
        self.bias = bias  # [out] bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out] float32
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).float()


class BF16Embedding(nn.Module):
    """bf16 table whose looked-up rows are widened to float32 (exact); shares the tensor with a tied head."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight  # [vocab, hidden] bf16

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [...] int64 -> [..., hidden] float32
        return F.embedding(ids, self.weight).float()


class Int8Linear(nn.Module):
    """W8A8 linear: per-output-channel symmetric int8 weights, per-row (per-token) dynamic int8 activations.

    Each row x is quantized with its own scale s = absmax(x) / 127, so a token's output depends on that
    token alone (batch-invariant), unlike `quantized::linear_dynamic`, which picks one scale per call.
    The int32 accumulation is exact, and the float epilogue is per element:
        y[m, n] = (sum_k xq[m, k] * wq[n, k]) * w_scale[n] * s[m]        (+ bias[n])
    Three paths give these same bits (kernels/linear.py, int8_linear_ref, is the reference):
      * specserve's own (kernels/csrc/int8_linear_cpu.cpp), where the CPU has AVX-512 VNNI or AVX2: AMX
        tiles where the CPU has them and K is a multiple of 64, else VNNI vectors, else AVX2 ones. All 121
        linears of the 135M model, 2 cores of an AMX Xeon, ms at M = 1 / 4 / 8 / 16 / 64 / 256: ~5.7 / 6.3 /
        6.6 / 7.4 / 15 / 58, against fbgemm's ~10 / 14 / 16 / 19 / 40 / 141 (the C++ file has the details).
        One op for every M: the exact integer sums make AMX, VNNI and AVX2 agree.
      * elsewhere fbgemm's fixed-input-scale linear, where the CPU has VNNI: the row is pre-scaled and
        rounded here, so the op's own quantization (scale 1, zero point 128) is exact. fbgemm needs a
        deprecated quantized tensor to prepack the weight; that happens once here, with its warning
        silenced. This class is the only place specserve touches torch's quantization ops.
      * elsewhere (no specserve kernel, no VNNI) float32 GEMMs over K chunks short enough to be exact
        (kernels/linear.py, exact_int_matmul). Not fbgemm: without VNNI it multiplies with vpmaddubsw, whose
        int16 pair sums saturate for these 0-255 inputs (int8 perplexity +25% on an AVX2 AMD EPYC).
    `path` says which: "kernel", "fbgemm" or "exact".
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float()  # [out, in]
        w_scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / _INT8_MAX  # [out]
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        w_int = torch.round(weight / w_scale[:, None]).clamp(-_INT8_MAX, _INT8_MAX)  # [out, in]
        self.register_buffer("bias", None if bias is None else bias.detach().float())  # [out]
        # Kernel operands, not state: kept out of state_dict like fbgemm's opaque packed weight.
        self.register_buffer("w_scale", w_scale, persistent=False)  # [out]
        self.packed_weight = None  # fbgemm's
        if cpu_ops.load() and torch.ops.specserve_cpu.int8_linear_fast():
            self.path = "kernel"
            packed, compensation = pack_int8_weight(w_int.to(torch.int8))
            self.register_buffer("packed", packed, persistent=False)  # int8_linear_cpu.cpp's layout
            self.register_buffer("compensation", compensation, persistent=False)  # [ceil(out / 16) * 16]
            return
        if not cpu_ops.has_cpu_flag("avx512_vnni", "avx_vnni"):
            self.path = "exact"
            self.register_buffer("int_weight", w_int, persistent=False)  # [out, in] float32 integers
            return
        self.path = "fbgemm"
        # quantize_per_channel rounds w * (1 / scale), which can land on the other side of a .5 than
        # w / scale; handing it w_int * scale (integers within an ulp) makes it reproduce w_int exactly.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            w_int8 = torch.quantize_per_channel(
                w_int * w_scale[:, None], w_scale, torch.zeros(self.out_features, dtype=torch.int64), 0, torch.qint8
            )
        self.packed_weight = torch.ops.quantized.linear_prepack(w_int8, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] float32 -> [..., out] float32
        rows = x.reshape(-1, self.in_features)  # [M, in]
        if self.path == "kernel":  # quantizes each row itself
            out = torch.ops.specserve_cpu.int8_linear(
                rows.contiguous().float(), self.packed, self.compensation, self.w_scale, self.bias
            )
            return out.view(*x.shape[:-1], self.out_features)
        if cpu_ops.applies(rows):  # the same values in one fused C++ call (kernels/csrc/rowwise_cpu.cpp)
            rows_int, row_scale = torch.ops.specserve_cpu.quantize_rows(rows.contiguous())
        else:
            rows_int, row_scale = quantize_rows_ref(rows)
        if self.path == "fbgemm":  # uint8 = rows_int + 128 exactly; the row scale is applied after
            out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                rows_int, 1.0, 128, self.packed_weight
            )  # [M, out]
        else:
            out = exact_int_matmul(rows_int, self.int_weight).float().mul_(self.w_scale)  # [M, out]
        out = out.mul_(row_scale)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def fused_operands(self) -> list[torch.Tensor] | None:
        """What `specserve_cpu::decoder_layers` needs to run this linear (engine/model.py), or None."""
        if self.path != "kernel" or self.bias is not None:
            return None
        return [self.packed, self.compensation, self.w_scale]


def apply_weight_dtype(
    model: nn.Module, dtype: str, calibration_ids: list[int] | None = None, alpha: float = DEFAULT_ALPHA
) -> nn.Module:
    """Swap `model`'s modules in place for `dtype` in {"float32", "bfloat16", "int8"}; returns `model`.
    bfloat16 and int8 also set the attention modules' prefill SDPA dtype (`_prefill_attention_in_bfloat16`).

    Every matmul of the model must be an `nn.Linear` (a tied LM head is an `nn.Linear` sharing the
    embedding's Parameter). A oneDNN-packed or int8 head is its own copy (`Float32Linear` shares the
    table); the embedding keeps its table (float32, or bfloat16 for bfloat16).
    int8 loses accuracy on models whose residual stream has outlier channels. Given `calibration_ids`
    (a `LlamaModel` and, say, the tokenized `smoothing.calibration_text()`), it first folds SmoothQuant
    scales into the float32 weights (engine/smoothing.py). On SmolLM2-135M, over 512 tokens of
    instructions, top-1 agreement with float32 / mean KL: int8 88.5% / 0.042, smoothed (alpha 0.5)
    93.6% / 0.018, bfloat16 98.8% / 0.0007; alpha 0.4 and 0.65 are slightly worse, 0.3 and 0.8 clearly.
    """
    if dtype == "float32":
        if cpu_ops.load() or can_pack():
            swap_modules(model, nn.Linear, lambda m: decode_linear(m.weight, m.bias, torch.float32))
        return model
    if dtype == "bfloat16":
        to_bf16 = _SharedCast(torch.bfloat16)  # a tied head's kernel weight is the embedding's bfloat16 table
        swap_modules(model, nn.Linear, lambda m: decode_linear(to_bf16(m.weight), m.bias, torch.bfloat16))
        swap_modules(model, nn.Embedding, lambda m: BF16Embedding(to_bf16(m.weight)))
        return _prefill_attention_in_bfloat16(model)
    if dtype == "int8":
        if calibration_ids is not None:
            assert isinstance(model, LlamaModel), "smoothing folds scales along the Llama layout"
            smooth_(model, collect_input_absmax(model, calibration_ids), alpha)
        swap_modules(model, nn.Linear, lambda m: Int8Linear(m.weight, m.bias))
        return _prefill_attention_in_bfloat16(model)
    raise InvalidRequestError(f"unknown weight dtype {dtype!r}; expected float32, bfloat16 or int8")


def _prefill_attention_in_bfloat16(model: nn.Module) -> nn.Module:
    """Long prefill chunks attend in bfloat16 (`Attention.sdpa_dtype`): these linears round every input
    to 8 bits of mantissa or less anyway. SmolLM2-135M, 2-core AMX Xeon: int8 prefill ~1.5x faster,
    perplexity +0.05% (int8) / +0.25% (bfloat16). Decode and draft-tree rows keep float32 attention.
    Only on CPUs with AMX tiles (`amx_bf16`): elsewhere bfloat16 SDPA is no faster than float32 (an AVX2-only
    AMD EPYC: 2-20% slower; a Zen 5 EPYC with AVX-512 BF16: 5-10% slower), and float32 chunks go to the C++
    prefill kernel (kernels/paged_attention.py), 1.4-2.5x faster than either there."""
    if not rounded_prefill_attention():
        return model
    for module in model.modules():
        if isinstance(module, Attention):
            module.sdpa_dtype = torch.bfloat16
    return model


class _SharedCast:
    """Casts parameters, returning the same cast for the same source so tied weights stay one Parameter."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.done: dict[int, tuple[torch.Tensor, nn.Parameter]] = {}  # id(source) -> (source, cast)

    def __call__(self, source: torch.Tensor) -> nn.Parameter:
        # The source is held in `done` so its id cannot be reused by a new tensor during the swap.
        if id(source) not in self.done:
            self.done[id(source)] = (source, nn.Parameter(source.detach().to(self.dtype), requires_grad=False))
        return self.done[id(source)][1]


def swap_modules(module: nn.Module, kind: type[nn.Module], convert: Callable[[nn.Module], nn.Module]) -> None:
    """Replace every submodule that is a `kind` with `convert(submodule)`, recursively."""
    for name, child in module.named_children():
        if isinstance(child, kind):
            setattr(module, name, convert(child))
        else:
            swap_modules(child, kind, convert)
