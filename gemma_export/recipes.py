"""Quantization recipes: which tensor class gets which format.

A recipe is data (frozen dataclasses); the passes in gemma_export/passes do the work. Named recipes
are built by small factories; options from the command line derive a new recipe with
dataclasses.replace and are checked here, so a recipe that makes no sense fails before any work.

Tensor classes of the decoder graph (passes/classify.py decides them from the exporter's module
paths): attention (q/k/v/o projections), mlp (gate/up/down), lm_head (the largest single weight),
other (Gemma 3n's AltUp/Laurel/per-layer projections: small; float32 in the fp32/int8 recipes,
int8 in int4's).
Host tables (embed_tokens, per_layer) have their own row format (TABLE_FORMATS, host_tables.py):
float32, int8 per row (the int8/int4 recipes' default) or int4 per row (`--tables int4`, half of
int8's bytes). Measured 2026-12-01 on Gemma 3 270M, 4096 tokens of CPython's docs vs its fp32
export (top-1 / KL / ppl ratio), tables int8 -> int4: fp32 graphs 99.0% / 0.0004 / 0.999 -> 86.1% /
0.096 / 1.106; int8 98.1% / 0.0011 / 0.998 -> 86.2% / 0.096 / 1.104; int4 91.3% / 0.031 / 1.021 ->
83.2% / 0.127 / 1.132; embed_tokens.bin 161.0 -> 81.0 MiB (float32: 640). One scale per 640-wide
row is coarse for 4 bits (relative RMS error of the rows 21%, int8's 1.7%), so int8 stays the
default. The encoders of Gemma 3n (vision.onnx, audio.onnx) have one format each (`vision`,
`audio`): 8 bits only, their weight MatMuls as MatMulNBits and their Conv kernels int8 per output
channel behind a DequantizeLinear (passes/convs.py); command-line block options do not touch them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ExportError

TENSOR_CLASSES = ("attention", "mlp", "lm_head", "other")
ENCODER_GRAPHS = ("vision", "audio")
BLOCK_SIZES = (16, 32, 64, 128)
# MatMulNBits: 0 unset (float), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations. onnxruntime's CPU
# kernels: 4-bit is fast at every level (level 4 about 2x level 0), 8-bit only at level 4 (at 0/1
# it dequantizes the whole weight every run, ~100x slower). int4 runs at 4 (its int8 attention
# too): on Gemma 3 270M the same quality as level 0 (90.7% vs 91.3% top-1, ppl ratio 1.022 vs
# 1.021) at 40x the decode speed (bench/int4_kernels.py). int8 stays at 0 by default: int8
# activations cost it 2.3 points of top-1 agreement (96.1% vs 98.4%, 1024 tokens);
# --accuracy-level 4 trades that for the fast kernels.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
TABLE_FORMATS = ("float32", "int8", "int4")  # host table rows: host_tables.py
DEFAULT_BLOCK = 32
# How an integer weight is stored in the graph: onnxruntime's contrib op MatMulNBits, or standard
# ONNX, DequantizeLinear(codes [K, N], scales [K / block, N], axis 0, block_size) + MatMul (opset
# 21), for providers that take no contrib ops (targets/openvino.toml: OpenVINO keeps the pair as a
# compressed weight; onnxruntime's CPU provider fuses it back into MatMulNBits). The same blocks
# and codes either way (blockwise.quantize), and the affine offsets the same MatMul + Add beside.
WEIGHT_STORAGES = ("matmulnbits", "qdq")


@dataclass(frozen=True)
class WeightFormat:
    """How one MatMul weight [K, N] is stored: `MatMulNBits` with `bits`, blocks of `block_size`
    along K, symmetric (implicit zero point 2^(bits-1)) or asymmetric (uint8 zero points), scales
    by round-to-nearest or by a per-block search (`scale_search`), `accuracy_level` for the kernel.
    bits=16 means float16 storage, cast to float32 in the graph (no MatMulNBits). storage "qdq":
    the same blocks behind a standard DequantizeLinear (WEIGHT_STORAGES); accuracy_level is then
    the provider's business (onnxruntime: session.qdq_matmulnbits_accuracy_level)."""

    bits: int
    block_size: int = DEFAULT_BLOCK
    symmetric: bool = True
    accuracy_level: int = 0
    scale_search: bool = True
    affine: bool = False  # asymmetric with float32 zero points (a fitted offset per block)
    storage: str = "matmulnbits"  # WEIGHT_STORAGES

    def check(self, where: str) -> None:
        if self.bits not in (4, 8, 16):
            raise ExportError(f"{where}: {self.bits}-bit weights are not supported (4, 8, or 16 for float16)")
        if self.bits == 16:
            return
        if self.storage not in WEIGHT_STORAGES:
            raise ExportError(f"{where}: weight storage {self.storage!r} is not one of {WEIGHT_STORAGES}")
        if self.block_size not in BLOCK_SIZES:
            raise ExportError(f"{where}: block size {self.block_size} is not supported (choose one of {', '.join(map(str, BLOCK_SIZES))})")
        if self.affine and self.symmetric:
            raise ExportError(f"{where}: float zero points (affine) need asymmetric blocks")
        if self.affine and self.bits == 8:
            raise ExportError(f"{where}: onnxruntime's CPU MatMulNBits takes no float zero points with 8-bit weights: drop --affine")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ExportError(f"{where}: accuracy level {self.accuracy_level} is not one of {ACCURACY_LEVELS}")


@dataclass(frozen=True)
class HostRows:
    """The rows that a 4-bit LM head tied to the token table is rescored from (passes/rescore.py):
    host table `table`'s int8 rows, each carrying the embedding multiplier `scale`; its rows
    [0, exact_rows) are the head's own (Gemma 3n's later rows embed image/audio tokens)."""

    table: str
    scale: float
    exact_rows: int


@dataclass(frozen=True)
class Recipe:
    """Per tensor class a WeightFormat, or None to keep the weight in float32."""

    name: str
    attention: WeightFormat | None = None
    mlp: WeightFormat | None = None
    lm_head: WeightFormat | None = None
    other: WeightFormat | None = None
    tables: str = "float32"  # host tables: one of TABLE_FORMATS (int8/int4 per row, float32 scales)
    # (module suffix, format) pairs that override the class's format for the weights whose module
    # path ends with the suffix (e.g. ("self_attn.v_proj", int8)): mixed precision within a class
    overrides: tuple[tuple[str, WeightFormat], ...] = ()
    # None, or what the block search was weighted by: per-input-channel mean x^2 of each MatMul on
    # calibration text (passes/calibrate.py), named here (e.g. "cpython-docs-tail:2048")
    calibration: str | None = None
    calibration_tokens: int = 2048
    # > 0: the LM head's K best candidates get their logits again from int8 rows (passes/rescore.py)
    lm_head_rescore: int = 0
    # where those rows come from: None, the graph's own int8 copy; HostRows, the tied token table
    # (the exporter sets it for a tied head under int8 tables: plan.py)
    lm_head_rows: HostRows | None = None
    # the encoder graphs of Gemma 3n exports (None: float32)
    vision: WeightFormat | None = None
    audio: WeightFormat | None = None

    def with_storage(self, storage: str) -> "Recipe":
        """This recipe with every integer weight (decoder and encoders) stored as `storage`."""
        if storage == "matmulnbits":
            return self

        def restore(fmt: WeightFormat | None) -> WeightFormat | None:
            return fmt if fmt is None or fmt.bits == 16 else dataclasses.replace(fmt, storage=storage)

        out = dataclasses.replace(
            self, attention=restore(self.attention), mlp=restore(self.mlp), lm_head=restore(self.lm_head),
            other=restore(self.other), overrides=tuple((m, restore(f)) for m, f in self.overrides),
            vision=restore(self.vision), audio=restore(self.audio))
        out.check()
        return out

    def with_token_table_rows(self, tied: HostRows | None) -> "Recipe":
        """This recipe, reading a rescored head's int8 rows from the tied token table `tied` when it
        can (a rescored head, int8 tables); otherwise unchanged."""
        if tied is None or not self.lm_head_rescore or self.tables != "int8" or self.lm_head_rows is not None:
            return self
        return dataclasses.replace(self, lm_head_rows=tied)

    def with_head_block_at_most(self, k: int) -> "Recipe":
        """This recipe with a 4-bit LM head's block lowered to the largest block size that fits
        K = `k` (LM_HEAD4_BLOCK is its default, not a choice the user made); otherwise unchanged."""
        head = self.lm_head
        if head is None or head.bits != 4 or head.block_size <= k:
            return self
        fits = largest_block_at_most(k)
        return self if fits is None else dataclasses.replace(self, lm_head=dataclasses.replace(head, block_size=fits))

    def encoder_format(self, graph: str) -> WeightFormat | None:
        """The format of the encoder graph `graph` ("vision" or "audio")."""
        if graph not in ENCODER_GRAPHS:
            raise ExportError(f"unknown encoder graph {graph!r} (known: {', '.join(ENCODER_GRAPHS)})")
        return getattr(self, graph)

    def format_for(self, tensor_class: str, module: str | None = None) -> WeightFormat | None:
        if tensor_class not in TENSOR_CLASSES:
            raise ExportError(f"unknown tensor class {tensor_class!r} (known: {', '.join(TENSOR_CLASSES)})")
        if module is not None and getattr(self, tensor_class) is not None:
            for suffix, fmt in self.overrides:
                if module == suffix or module.endswith("." + suffix):
                    return fmt
        return getattr(self, tensor_class)

    @property
    def formats(self) -> tuple[WeightFormat, ...]:
        return tuple(f for f in (self.attention, self.mlp, self.lm_head, self.other, *(f for _, f in self.overrides))
                     if f is not None)

    @property
    def changes_graph(self) -> bool:
        return bool(self.formats)

    @property
    def min_onnxruntime(self) -> str:
        """MatMulNBits bits=4 with accuracy_level runs on CPU from 1.20 (this project's floor);
        bits=8 got its x64 kernel in 1.22. Blocked QDQ weights (opset 21) need 1.20; float16 ones 1.17."""
        nbits = [f for f in (*self.formats, self.vision, self.audio)
                 if f is not None and f.bits in (4, 8) and f.storage == "matmulnbits"]
        qdq = any(f is not None and f.bits in (4, 8) and f.storage == "qdq" for f in (*self.formats, self.vision, self.audio))
        return "1.22" if any(f.bits == 8 for f in nbits) else "1.20" if nbits or qdq else "1.17"

    def check(self) -> None:
        for cls in TENSOR_CLASSES:
            fmt = self.format_for(cls)
            if fmt is not None:
                fmt.check(f"recipe {self.name}, {cls}")
        for suffix, fmt in self.overrides:
            fmt.check(f"recipe {self.name}, {suffix}")
        for graph in ENCODER_GRAPHS:
            fmt = self.encoder_format(graph)
            if fmt is not None:
                fmt.check(f"recipe {self.name}, {graph}")
                if fmt.bits != 8:
                    raise ExportError(f"recipe {self.name}: the {graph} encoder takes 8-bit weights only, not {fmt.bits}")
        if self.calibration is not None and not any(f.bits in (4, 8) and f.scale_search for f in self.formats):
            raise ExportError(f"recipe {self.name}: calibration weights the block search of 4/8-bit weights; this recipe has none")
        if self.tables not in TABLE_FORMATS:
            raise ExportError(f"recipe {self.name}: host table format {self.tables!r} is not one of {TABLE_FORMATS}")
        if self.lm_head_rescore < 0 or (self.lm_head_rescore and (self.lm_head is None or self.lm_head.bits != 4)):
            raise ExportError(f"recipe {self.name}: rescoring {self.lm_head_rescore} LM-head candidates needs a 4-bit LM head")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fp32() -> Recipe:
    return Recipe("fp32")


def fp16() -> Recipe:
    """Weights of every MatMul stored as float16 and cast to float32 in the graph: the residual
    stream, norms, soft-caps and all arithmetic stay float32 (Gemma overflows in float16)."""
    half = WeightFormat(bits=16)
    return Recipe("fp16", attention=half, mlp=half, lm_head=half, other=half)


# Encoders under the int8 and int4 recipes: 8-bit weights (MatMulNBits blocks of 32, Conv kernels
# per output channel). Soft-embedding cosine to fp32, real photos and speech through the full-size
# random-weight towers: vision 0.997-0.998, audio 0.9999 (bench/vision_latency.py, audio_latency.py).
ENCODER_W8 = WeightFormat(bits=8, block_size=DEFAULT_BLOCK)


def int8() -> Recipe:
    w8 = WeightFormat(bits=8, block_size=DEFAULT_BLOCK)
    return Recipe("int8", attention=w8, mlp=w8, lm_head=w8, tables="int8", vision=ENCODER_W8, audio=ENCODER_W8)


def int4() -> Recipe:
    """MLP weights in 4-bit blocks of 32, affine (a fitted float offset per block), the block search
    weighted by activation statistics from calibration text (llama.cpp's imatrix;
    passes/calibrate.py); attention in int8 (blocks of 32); the LM head in int8 blocks of 64. All
    at accuracy level 4 (int8 activations: onnxruntime's fast CPU kernels, see ACCURACY_LEVELS).

    On Gemma 3 270M vs its fp32 export, 4096 tokens of CPython's docs (top-1 / KL / ppl ratio):
    plain affine search 80.3% / - / 1.178; + calibration 89.2% / - / 1.043; + k/v int8 91.3% / 0.031
    / 1.021; at accuracy level 4 90.8% / 0.034 / 1.023 (the recipe until 2026-12-01). Then all
    attention in int8 (the affine q/o needed a block-sum MatMul, an offsets MatMul and an Add each:
    626 -> 518 nodes) and the LM head in blocks of 128 instead of 32: 90.8% / 0.033 / 1.022, decode
    1.10-1.27x (bench/compare_exports.py, interleaved runs, 128-token prompt); blocks of 64 (the
    block must not exceed K, 64 in the test models) on the first 2048 tokens: 90.8% / 0.031 / 1.025
    (128: 90.7% / 0.032 / 1.025; speed not measured apart: 5 MiB more a step).
    `--lm-head 4` makes the LM head 4-bit with its best LM_HEAD_RESCORE candidates rescored from
    int8 rows (passes/rescore.py): 90.5% / 0.035 / 1.026 (head blocks of 64; 0.036 / 1.028 with
    128) and decode another 1.13-1.33x; its blocks are LM_HEAD4_BLOCK (128) since 2026-12-07. A
    head tied to the int8 token table reads those rows from the table itself (recipe.lm_head_rows,
    manifest.table_inputs): on the 270M the export is 375 MiB (370 with the head in blocks of 128)
    instead of 536 with the rows in decoder.data (the int8-head default: 455), at the same quality
    (first 2048 tokens: 91.11% / 0.0331 / 1.0284 either way); an untied head keeps its own copy.
    The 4-bit head without rescoring: 83.3% / 0.088 / 1.085.
    Calibration runs the fp32 model: an export without a tokenizer (random weights) is quantized
    uncalibrated and its manifest's recipe says calibration null.

    Gemma 3n's `other` weights (AltUp, LAuReL, the per-layer gates and projections: 0.27 GiB in
    float32 on E2B) are int8 blocks of 32 at level 4: a float MatMul's weight stays mapped from
    the data file and onnxruntime also prepacks a copy of it. On E2B-shaped random weights (2
    threads, bench/full_size_random.py --cold) the runtime's peak RSS went from 3.06 to 2.86 GiB
    and decode from 10.0 to 12.4 tokens/s; their quality on real Gemma 3n weights is not measured
    here (no such checkpoint is reachable)."""
    w4 = WeightFormat(bits=4, block_size=DEFAULT_BLOCK, symmetric=False, affine=True, accuracy_level=4)
    w8 = WeightFormat(bits=8, block_size=DEFAULT_BLOCK, accuracy_level=4)
    head = WeightFormat(bits=8, block_size=64, accuracy_level=4)  # 64: fits every Gemma's (and test model's) K
    return Recipe("int4", attention=w8, mlp=w4, lm_head=head, other=w8, tables="int8",
                  calibration="cpython-docs-tail", vision=ENCODER_W8, audio=ENCODER_W8)


# blocks of a 4-bit LM head (--lm-head 4, unless --block-size says otherwise): it only picks the
# candidates that int8 rows rescore, so it can take coarser blocks than the int8 head. Gemma 3 270M,
# first 2048 tokens, against blocks of 64: 91.11% top-1 either way, KL 0.0331 -> 0.0343, ppl ratio
# 1.0284 -> 1.0292; decode 1.06x / 1.04x after 128 / 1024 tokens (bench/compare_exports.py, median
# of 5 interleaved runs, 2 threads, 2026-12-07; 5 MiB less read a step). A head narrower than that
# (the tiny test models: 64) gets the largest block that fits it (Recipe.with_head_block_at_most).
LM_HEAD4_BLOCK = 128

# candidates of a 4-bit LM head rescored from int8 rows, unless --lm-head-rescore says otherwise:
# on Gemma 3 270M, 32 -> 512 took the KL to fp32 from 0.045 to 0.035 at no measured speed cost on
# 2 threads (an E2B-shaped head on 4 threads of the lent machine: 10.6 ms alone, 11.2 with 64, 12.5
# with 512; the int8 head of blocks of 32 17.4)
LM_HEAD_RESCORE = 512


RECIPES = {"fp32": fp32, "fp16": fp16, "int8": int8, "int4": int4}


@dataclass(frozen=True)
class RecipeOptions:
    """Command-line changes to a named recipe; None leaves the recipe's choice."""

    block_size: int | None = None
    symmetric: bool | None = None
    accuracy_level: int | None = None
    lm_head_bits: int | None = None  # 4, 8 or 32 (float)
    lm_head_rescore: int | None = None  # candidates of a 4-bit LM head rescored from int8 rows; 0: none
    scale_search: bool | None = None
    tables: str | None = None
    affine: bool | None = None

    def given(self) -> list[str]:
        flags = {"block_size": "--block-size", "symmetric": "--asymmetric/--symmetric", "accuracy_level": "--accuracy-level",
                 "lm_head_bits": "--lm-head", "lm_head_rescore": "--lm-head-rescore", "scale_search": "--rtn", "tables": "--tables", "affine": "--affine"}
        return [flag for field, flag in flags.items() if getattr(self, field) is not None]


def make_recipe(name: str, options: RecipeOptions = RecipeOptions()) -> Recipe:
    """The named recipe with `options` applied; raises ExportError on a combination that makes no
    sense (block options on a float recipe, unknown sizes, ...)."""
    if name not in RECIPES:
        raise ExportError(f"--quant {name} is not a recipe (recipes: {', '.join(RECIPES)})")
    recipe = RECIPES[name]()
    integer = [f for f in recipe.formats if f.bits in (4, 8)]
    if not integer:
        given = options.given()
        if given and given != ["--tables"]:
            raise ExportError(f"{', '.join(given)} only apply to the int4 and int8 recipes, not --quant {name}")
    changes = {k: v for k, v in (("block_size", options.block_size), ("symmetric", options.symmetric),
                                 ("accuracy_level", options.accuracy_level), ("scale_search", options.scale_search))
               if v is not None}
    if options.affine and not any(f.bits == 4 for f in integer):
        raise ExportError(f"--affine: float zero points exist for 4-bit weights only (onnxruntime's CPU MatMulNBits "
                          f"takes none with 8-bit weights), and --quant {name} has no 4-bit weights")
    if options.symmetric is not None:
        changes["affine"] = False  # --symmetric / --asymmetric (uint8 zero points); --affine sets it back
    if options.affine:
        changes.update(symmetric=False, affine=True)

    def apply(fmt: WeightFormat | None) -> WeightFormat | None:
        if fmt is None or fmt.bits not in (4, 8):
            return fmt
        # float zero points exist for 4-bit weights only (onnxruntime's CPU kernel): --affine on
        # the int4 recipe leaves its int8 LM head symmetric
        own = changes if fmt.bits == 4 or not changes.get("affine") else {k: v for k, v in changes.items() if k not in ("affine", "symmetric")}
        return dataclasses.replace(fmt, **own)

    recipe = dataclasses.replace(recipe, attention=apply(recipe.attention), mlp=apply(recipe.mlp),
                                 lm_head=apply(recipe.lm_head), other=apply(recipe.other),
                                 overrides=tuple((m, apply(f)) for m, f in recipe.overrides))
    if options.scale_search is False and recipe.calibration is not None:
        recipe = dataclasses.replace(recipe, calibration=None)  # --rtn: no search to weight
    if options.lm_head_bits is not None:
        if options.lm_head_bits not in (4, 8, 32):
            raise ExportError(f"--lm-head {options.lm_head_bits}: choose 4, 8 or 32 (float)")
        base = recipe.lm_head or recipe.mlp
        head = None if options.lm_head_bits == 32 else dataclasses.replace(base, bits=options.lm_head_bits)
        if options.lm_head_bits == 4 and options.block_size is None:
            head = dataclasses.replace(head, block_size=LM_HEAD4_BLOCK)
        recipe = dataclasses.replace(recipe, lm_head=head)
        # a 4-bit head is rescored by default (passes/rescore.py): alone it misses the quality floor
        recipe = dataclasses.replace(recipe, lm_head_rescore=LM_HEAD_RESCORE if options.lm_head_bits == 4 else 0)
    if options.lm_head_rescore is not None:
        recipe = dataclasses.replace(recipe, lm_head_rescore=options.lm_head_rescore)
    if options.tables is not None:
        recipe = dataclasses.replace(recipe, tables=options.tables)
    recipe.check()
    return recipe


def largest_block_at_most(k: int) -> int | None:
    """The largest of BLOCK_SIZES that fits a weight of K = `k`, or None."""
    return max((b for b in BLOCK_SIZES if b <= k), default=None)


def check_recipe_fits(recipe: Recipe, contraction_dims: dict[str, int]) -> None:
    """A block must fit the weight's K (the contraction dimension) of every class it applies to:
    e.g. block 128 on a 64-wide tiny model would pad every block with dead weights."""
    for cls, k in contraction_dims.items():
        fmt = recipe.format_for(cls)
        if fmt is not None and fmt.bits in (4, 8) and fmt.block_size > k:
            raise ExportError(
                f"block size {fmt.block_size} exceeds K = {k} of the {cls} weights of this model: "
                f"choose --block-size {largest_block_at_most(k) or BLOCK_SIZES[0]} or less"
            )
