"""The int4 recipe: how an int4 export rounds its weights and which MatMuls stay wider.

Pure data. A recipe is turned into the genai builder's ``--extra_options``
(:meth:`Int4Recipe.builder_options`) or into onnxruntime's ``MatMulNBitsQuantizer`` arguments
(``exporters.quantize``), and recorded in the bundle's manifest (``quantization``).

Methods (both export paths quantize with onnxruntime's ``MatMulNBitsQuantizer``):

- ``rtn``: onnxruntime's own blockwise round-to-nearest (MLAS; the builder's
  ``algo_config=default``): one scale per block, symmetric int4 without zero points.
- ``rtn_inc``: the round-to-nearest ported from Intel Neural Compressor (the builder's
  ``algo_config=rtn``): the same idea, a scale that leaves one of the 16 levels unused.
- ``k_quant``: llama.cpp's k-quant scale search (the builder's ``algo_config=k_quant``):
  asymmetric (scale and zero point per block), each block's scale and minimum chosen to
  minimize a weighted squared error over 20 candidate ranges.

``lm_head`` is the last MatMul (the vocabulary projection, the largest matrix of a small LLM
and the one whose errors reach the logits directly): int4, int8 or fp32; with tied
embeddings (SmolLM2, Gemma 3) the builder's embedding reads the quantized lm_head, so the
embedding table follows it. ``sensitive_layers``
int8 promotes llama.cpp's "mixed" set (:func:`sensitive_layers`: the attention v and MLP
down projections of the first and last eighth of the layers and of every third layer; the
genai builder promotes its fused qkv projection, which holds v).

DEFAULT, ``rtn-bs32-lmhead8`` (the builder's round-to-nearest in blocks of 32, the lm_head in
int8), was chosen with ``benchmarks/int4_recipes.py`` (benchmarks/README.md, "int4 recipes"):
on SmolLM2-135M it cuts what int4 costs in KL divergence from fp32 by 27 % (0.26 against
0.36 for plain ``rtn-bs32``) and in perplexity by half (+5.4 % against +11.0 %) for 14 MB more
(104 MB), decoding at 0.96 of rtn-bs32's speed (within the run's noise). ``rtn-bs64-mixed``
scored better still on those figures (KL 0.21, 1.05x the speed), but answered the README's
own question, "What is the capital of France?", with nonsense where rtn-bs32-lmhead8 says
Paris; ``rtn-bs32-mixed`` (KL 0.17) decodes 13 % slower. On Gemma 3 270M no int4 recipe
passes the quality gate with margin (the best, k_quant-bs32-mixed, +21 %): its built-in
default is int8 (``exporters.sources``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from exporters.errors import ExportOptionError

# Our method name -> the genai builder's ``algo_config`` base method.
METHODS = {"rtn": "default", "rtn_inc": "rtn", "k_quant": "k_quant"}
BLOCK_SIZES = (16, 32, 64, 128, 256)
# MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
LM_HEAD_TYPES = ("int4", "int8", "fp32")
SENSITIVE_TYPES = ("int4", "int8")
LM_HEAD_NODE = "/lm_head/MatMul"  # the builder's name for the last MatMul


@dataclass(frozen=True)
class Int4Recipe:
    method: str = "rtn"
    block_size: int = 32
    # None: the builder's default for the device, 4 (int8 activations) on CPU, 0 elsewhere
    accuracy_level: int | None = None
    symmetric: bool = True
    lm_head: str = "int4"
    sensitive_layers: str = "int4"

    def __post_init__(self):
        for label, value, allowed in (
                ("method", self.method, tuple(METHODS)),
                ("block_size", self.block_size, BLOCK_SIZES),
                ("accuracy_level", self.accuracy_level, (None, *ACCURACY_LEVELS)),
                ("symmetric", self.symmetric, (True, False)),
                ("lm_head", self.lm_head, LM_HEAD_TYPES),
                ("sensitive_layers", self.sensitive_layers, SENSITIVE_TYPES)):
            if value not in allowed or type(value) is not type(_first(allowed, value)):
                shown = ", ".join(str(a) for a in allowed if a is not None)
                raise ExportOptionError(f"int4 recipe: {label}={value!r} is not one of {shown}")
        if self.method == "k_quant" and self.symmetric:
            # k-quant always writes a zero point per block; say so rather than record a lie
            object.__setattr__(self, "symmetric", False)

    def name(self, device: str = "cpu") -> str:
        """A short name: the named recipe it equals on ``device``, else its fields that
        differ from the base recipe's."""
        mine = self.for_device(device)
        for key, recipe in NAMED.items():
            if recipe.for_device(device) == mine:
                return key
        base = _BASE.for_device(device)
        return ",".join(f"{f.name}={getattr(mine, f.name)}" for f in fields(self)
                        if getattr(mine, f.name) != getattr(base, f.name))

    def for_device(self, device: str) -> Int4Recipe:
        """With ``accuracy_level`` resolved as the builder resolves it for ``device``."""
        if self.accuracy_level is not None:
            return self
        return replace(self, accuracy_level=4 if device == "cpu" else 0)

    def builder_options(self, device: str = "cpu") -> dict[str, str]:
        """The genai builder's ``--extra_options`` for this recipe, as KEY -> VALUE strings."""
        r = self.for_device(device)
        opts = {"algo_config": METHODS[r.method], "block_size": str(r.block_size),
                "accuracy_level": str(r.accuracy_level)}
        if r.method != "k_quant":  # k-quant writes zero points whatever this says
            opts["is_symmetric"] = "true" if r.symmetric else "false"
        mixed = []
        if r.lm_head == "int8":
            mixed.append("last_matmul:int8")
        if r.sensitive_layers == "int8":
            mixed.append("mixed_layers:int8")
        if mixed:
            opts["matmul_mixed_precision"] = ",".join(mixed)
        if r.lm_head == "fp32":
            opts["nodes_to_exclude"] = LM_HEAD_NODE
        return opts

    def as_manifest(self, device: str = "cpu") -> dict:
        """What the manifest records (``quantization``)."""
        return {"weights": "int4", "recipe": self.name(device),
                **asdict(self.for_device(device))}


def _first(allowed: tuple, value):
    """The allowed entry equal to ``value`` (so True is not taken for 1, nor 32.0 for 32)."""
    return next((a for a in allowed if a == value and a is not None), value)


_BASE = Int4Recipe()
NAMED: dict[str, Int4Recipe] = {
    "rtn-bs32": _BASE,
    "rtn-bs64": Int4Recipe(block_size=64),
    "rtn-bs128": Int4Recipe(block_size=128),
    "rtn-bs32-lmhead8": Int4Recipe(lm_head="int8"),
    "rtn-bs64-lmhead8": Int4Recipe(block_size=64, lm_head="int8"),
    "rtn-bs32-lmhead32": Int4Recipe(lm_head="fp32"),
    "rtn-bs32-acc1": Int4Recipe(accuracy_level=1),
    "rtn_inc-bs32": Int4Recipe(method="rtn_inc"),
    "k_quant-bs32": Int4Recipe(method="k_quant"),
    "k_quant-bs64": Int4Recipe(method="k_quant", block_size=64),
    "k_quant-bs128": Int4Recipe(method="k_quant", block_size=128),
    "k_quant-bs32-lmhead8": Int4Recipe(method="k_quant", lm_head="int8"),
    "rtn-bs32-mixed": Int4Recipe(lm_head="int8", sensitive_layers="int8"),
    "rtn-bs64-mixed": Int4Recipe(block_size=64, lm_head="int8", sensitive_layers="int8"),
    "k_quant-bs32-mixed": Int4Recipe(method="k_quant", lm_head="int8", sensitive_layers="int8"),
}
DEFAULT_NAME = "rtn-bs32-lmhead8"
DEFAULT = NAMED[DEFAULT_NAME]


def resolve(spec: str | dict | Int4Recipe | None) -> Int4Recipe:
    """The recipe ``spec`` names: None (DEFAULT), a name in NAMED, ``key=value,...`` over
    the base recipe (``method=k_quant,block_size=64``), a dict of fields, or a recipe."""
    if spec is None:
        return DEFAULT
    if isinstance(spec, Int4Recipe):
        return spec
    if isinstance(spec, str):
        if spec in NAMED:
            return NAMED[spec]
        if "=" not in spec:
            raise ExportOptionError(
                f"unknown int4 recipe {spec!r}: use one of {', '.join(NAMED)} or "
                f"key=value pairs ({', '.join(f.name for f in fields(Int4Recipe))})")
        spec = dict(_pair(item) for item in spec.split(",") if item.strip())
    if not isinstance(spec, dict):
        raise ExportOptionError(f"int4 recipe {spec!r} is not a name, key=value text or dict")
    known = {f.name: f for f in fields(Int4Recipe)}
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise ExportOptionError(f"int4 recipe: unknown field {', '.join(unknown)} "
                                f"(fields: {', '.join(known)})")
    return Int4Recipe(**{k: _typed(k, v) for k, v in spec.items()})


def _pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ExportOptionError(f"int4 recipe: {item.strip()!r} is not key=value")
    return key.strip(), value.strip()


def _typed(key: str, value):
    """Text from ``key=value`` as the field's type; other values are checked as given."""
    if not isinstance(value, str):
        return value
    if key in ("block_size", "accuracy_level"):
        if value.lower() == "none" and key == "accuracy_level":
            return None
        try:
            return int(value)
        except ValueError:
            raise ExportOptionError(f"int4 recipe: {key}={value!r} is not a number") from None
    if key == "symmetric":
        if value.lower() not in ("true", "false", "1", "0"):
            raise ExportOptionError(f"int4 recipe: symmetric={value!r} is not true or false")
        return value.lower() in ("true", "1")
    return value


def sensitive_layers(num_layers: int) -> list[int]:
    """The layers llama.cpp's mixed quantization gives more bits (its attention v and MLP
    down projections), selected as the genai builder selects them: the first and last
    eighth, and every third layer between."""
    eighth = num_layers / 8
    return [i for i in range(num_layers)
            if i < eighth or i >= 7 * eighth or (i - round(eighth)) % 3 == 2]


def recipe_for_precision(precision: str | None, spec) -> Int4Recipe | None:
    """The recipe an export at ``precision`` uses (None when it quantizes to no int4);
    naming a recipe for an explicit non-int4 precision is an option error."""
    if spec is not None and precision not in (None, "int4"):
        raise ExportOptionError(f"an int4 recipe was given for a {precision} export")
    return resolve(spec)
