"""Rules an exported checkpoint must pass before it is registered (run by tasks/audit.py).

Each rule checks the export against its recipe (``AuditInputs.recipe``; the reference recipe when
none is given): every quantized linear has the tensors of the format that the recipe gives its
module group (``tasks/audit_formats.py``: NVFP4, W4A16 NVFP4, FP8), and the declared
``quant_algo`` / ``quantized_layers`` and KV cache say the same.

A rule is a function ``(AuditInputs) -> list[Issue]``; an empty list means the rule passed. Rules
read both checkpoints through :class:`quantdag.format.checkpoint.Checkpoint`: shapes and dtypes
from the safetensors headers, values one tensor at a time and only where needed (NVFP4 scales,
``mtp.*`` tensors), so a 27B export is never held in memory. A missing or malformed file raises
:class:`~quantdag.format.checkpoint.CheckpointFileError`, which the runner records as the rule's
finding.

Vocabulary used by every rule:

- *module*: a tensor name without its last component (``model.layers.0.mlp.up_proj``).
- *quantized linear*: a module with a ``weight_scale`` tensor.
- *linear weight*: a 2-D ``<module>.weight`` whose module's last component does not contain
  ``embed`` (embedding tables are 2-D but are gathered, not multiplied). Norm weights and biases
  (1-D), ``conv1d`` (3-D) and the vision patch embedding ``Conv3d`` (5-D) are not linear weights.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from conf.recipe import RecipeSpec
from quantdag.format.checkpoint import QUANT_CONFIG_FILE, Checkpoint, TensorInfo
from tasks.audit_formats import SHARED_SCALES, declared_algo_problems, expected_algo, linear_problems, value_problem

GLOBAL_SCALES = ("weight_scale_2", "input_scale")
SCALE_LEAVES = ("weight_scale", *GLOBAL_SCALES)

# Modules that vLLM loads into one fused weight (its ``packed_modules_mapping``): fused name ->
# the checkpoint leaves it is built from. One engine-side weight has ONE format, ONE
# ``weight_scale_2`` and ONE ``input_scale``, so the members must be quantized alike and share
# those scalars (``tasks.audit_formats.SHARED_SCALES``).
FUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"),  # Qwen3.5 Gated DeltaNet
    "in_proj_ba": ("in_proj_b", "in_proj_a"),
}
_FUSED_OF_LEAF = {leaf: fused for fused, leaves in FUSED_GROUPS.items() for leaf in leaves}

# Tensors a calibrated KV-cache quantizer leaves behind in a modelopt export
# (``<attn>.k_proj.k_scale`` = K amax / 448, and the affine variants' biases).
KV_TENSOR_SUFFIXES = (".k_scale", ".v_scale", ".k_bias", ".v_bias")


@dataclass(frozen=True)
class AuditInputs:
    """What every rule receives: the export, its BF16 base, the caller's VLM override, the recipe.

    ``base`` is None when the base has no safetensors (a GGUF file): no ``mtp.*`` to compare.
    ``recipe`` None means the reference recipe (``RecipeSpec()``).
    """

    export: Checkpoint
    base: Checkpoint | None
    is_vlm: bool | None
    recipe: RecipeSpec | None = None

    @property
    def expected(self) -> RecipeSpec:
        """The recipe the export is checked against."""
        return self.recipe or RecipeSpec()

    def quantized_algos(self) -> dict[str, str | None]:
        """Module with a ``weight_scale`` -> the ``quant_algo`` the recipe gives it (None: BF16)."""
        return {module: expected_algo(self.expected, module)
                for module, params in self.export.modules.items() if "weight_scale" in params}


class Issue(NamedTuple):
    """One failure a rule found: the module (or tensor, or file) and what is wrong with it."""

    module: str
    message: str


def is_linear_weight(name: str, info: TensorInfo) -> bool:
    """Whether tensor ``name`` is a linear layer's weight (see the module docstring)."""
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and len(info.shape) == 2 and "embed" not in module.rpartition(".")[2]


def exclude_patterns(export: Checkpoint) -> list[str]:
    """``quantization.exclude_modules`` of ``hf_quant_config.json`` (fnmatch patterns)."""
    patterns = export.quantization().get("exclude_modules")
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise export.error(QUANT_CONFIG_FILE, "quantization.exclude_modules is not a string list")
    return patterns


def matching_pattern(module: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that ``module`` matches, case-sensitively (vLLM matches with fnmatch)."""
    return next((p for p in patterns if fnmatch.fnmatchcase(module, p)), None)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def check_quantized_linear_format(inputs: AuditInputs) -> list[Issue]:
    """Storage format of every quantized linear: the format its module group has in the recipe.

    Per module with a ``weight_scale``, the tensors of ``tasks.audit_formats.expected_algo`` (NVFP4:
    U8 ``weight [out, in/2]``, F8_E4M3 ``weight_scale [out, in/16]`` with finite values >= 0, F32
    scalars ``weight_scale_2`` and ``input_scale`` finite and > 0; W4A16 NVFP4 without
    ``input_scale``; FP8: F8_E4M3 ``weight [out, in]`` without NaN codes, F32 scalars
    ``weight_scale`` and ``input_scale``). ``out``/``in`` come from the base's BF16 weight when the
    base has one. A module the recipe keeps in BF16 that carries scales, and a U8 or F8_E4M3 weight,
    ``weight_scale_2`` or ``input_scale`` without ``weight_scale``, are reported too.
    """
    problems: dict[str, list[str]] = defaultdict(list)
    algos = inputs.quantized_algos()
    to_read: list[str] = []
    for module, params in inputs.export.modules.items():
        algo = algos.get(module)
        if module in algos and algo is None:
            problems[module].append(f"carries {[leaf for leaf in SCALE_LEAVES if leaf in params]} but the recipe "
                                    f"{inputs.expected.name!r} keeps its group in BF16")
        elif algo is not None:
            problems[module] += linear_problems(algo, module, params, inputs.base)
            to_read += [f"{module}.{leaf}" for leaf in (*SCALE_LEAVES, *(("weight",) if algo == "FP8" else ()))
                        if leaf in params]
            continue
        stray = [leaf for leaf in GLOBAL_SCALES if leaf in params]
        if stray and module not in algos:
            problems[module].append(f"has {', '.join(stray)} but no weight_scale")
        if "weight" in params and params["weight"].dtype in ("U8", "F8_E4M3") and module not in algos:
            problems[module].append(f"weight is {params['weight'].dtype} (quantized) but has no weight_scale")
    for name, tensor in inputs.export.read(to_read):
        module, _, leaf = name.rpartition(".")
        if (found := value_problem(algos[module], leaf, tensor)) is not None:
            problems[module].append(found)
    return [Issue(module, "; ".join(found)) for module, found in problems.items() if found]


def check_exclusions(inputs: AuditInputs) -> list[Issue]:
    """Unquantized linears are declared and declared modules are unquantized (modelopt config).

    ``hf_quant_config.json`` ``quantization.exclude_modules`` must equal, as a set, the list in
    ``config.json`` ``quantization_config`` (modelopt 0.47 writes it as ``ignore``). Every linear
    weight without ``weight_scale`` must match a pattern (else an engine builds an NVFP4 layer for
    a BF16 tensor), and no module that matches a pattern may carry NVFP4 scales.
    """
    export = inputs.export
    patterns = exclude_patterns(export)
    issues: list[Issue] = []
    mirror = export.json("config.json").get("quantization_config")
    if not isinstance(mirror, dict):
        issues.append(Issue("config.json", "has no quantization_config: read as unquantized"))
    else:
        listed = mirror.get("ignore", mirror.get("exclude_modules"))
        listed = set(listed) if isinstance(listed, list) else set()
        if listed != set(patterns):
            issues.append(Issue("config.json", (
                "quantization_config.ignore disagrees with hf_quant_config.json exclude_modules: "
                f"only in config.json {sorted(listed - set(patterns))}, "
                f"only in hf_quant_config.json {sorted(set(patterns) - listed)}"
            )))
    for module, params in export.modules.items():
        pattern = matching_pattern(module, patterns)
        scales = [leaf for leaf in SCALE_LEAVES if leaf in params]
        if scales and pattern is not None:
            issues.append(Issue(module, f"matches exclude pattern {pattern!r}, carries {scales}"))
        weight = params.get("weight")
        if weight is None or scales or pattern is not None:
            continue
        if is_linear_weight(f"{module}.weight", weight):
            message = f"unquantized linear weight {weight} matches no exclude pattern"
            issues.append(Issue(module, message))
    return issues


def check_fused_siblings(inputs: AuditInputs) -> list[Issue]:
    """Modules fused into one engine weight are quantized alike (vLLM's packed module mapping).

    Groups (:data:`FUSED_GROUPS`, members under the same parent module): all members quantized or
    none, in one format; when quantized, the scalars of ``tasks.audit_formats.SHARED_SCALES`` for
    that format (NVFP4: ``weight_scale_2`` and ``input_scale``) bit-identical across members.
    """
    export = inputs.export
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, params in export.modules.items():
        parent, _, leaf = module.rpartition(".")
        if leaf in _FUSED_OF_LEAF and "weight" in params:
            groups[(parent, _FUSED_OF_LEAF[leaf])].append(module)
    issues: list[Issue] = []
    for (parent, fused), members in sorted(groups.items()):
        if len(members) < 2:
            continue
        members.sort(key=lambda m: FUSED_GROUPS[fused].index(m.rpartition(".")[2]))
        label = f"{parent}.{fused} [{', '.join(m.rpartition('.')[2] for m in members)}]"
        quantized = [m for m in members if "weight_scale" in export.modules[m]]
        if quantized and len(quantized) < len(members):
            plain = [m.rpartition(".")[2] for m in members if m not in quantized]
            issues.append(Issue(label, f"partly quantized: unquantized {plain}"))
            continue
        formats = {m.rpartition(".")[2]: expected_algo(inputs.expected, m) for m in quantized}
        if len(set(formats.values())) > 1:
            issues.append(Issue(label, f"members in different formats: {formats}"))
            continue
        for leaf in SHARED_SCALES.get(next(iter(formats.values()), None), ()) if quantized else ():
            names = [f"{m}.{leaf}" for m in members if leaf in export.modules[m]]
            if len(names) < len(members):
                continue  # a missing scale is a quantized-linear-format finding
            values = {n.split(".")[-2]: t for n, t in export.read(names)}
            if len({_as_bytes(t).numpy().tobytes() for t in values.values()}) > 1:
                shown = {member: t.flatten().tolist() for member, t in values.items()}
                issues.append(Issue(label, f"{leaf} differs across members: {shown}"))
    return issues


def check_mtp_preserved(inputs: AuditInputs) -> list[Issue]:
    """Every ``mtp.*`` tensor of the base is in the export, same dtype, shape and bytes.

    The multi-token-prediction head stays BF16 in the recipe; transformers does not load it
    (``_keys_to_ignore_on_load_unexpected``), so the export step copies it over. Compared one
    tensor at a time.
    """
    base, export = inputs.base, inputs.export
    issues: list[Issue] = []
    same_layout: list[str] = []
    if base is None:
        return issues
    for name in sorted(n for n in base.tensors if n.startswith("mtp.")):
        want, got = base.tensors[name], export.tensors.get(name)
        if got is None:
            issues.append(Issue(name, "missing from the export"))
        elif (got.dtype, got.shape) != (want.dtype, want.shape):
            issues.append(Issue(name, f"export has {got}, base has {want}"))
        else:
            same_layout.append(name)
    pairs = zip(base.read(same_layout), export.read(same_layout), strict=True)
    for (name, want_tensor), (_, got_tensor) in pairs:
        want_b, got_b = _as_bytes(want_tensor), _as_bytes(got_tensor)
        if not torch.equal(want_b, got_b):
            differing = int((want_b != got_b).sum())
            issues.append(Issue(name, f"{differing} of {want_b.numel()} bytes differ from base"))
    return issues


def check_loadable(inputs: AuditInputs) -> list[Issue]:
    """The export loads for serving: tokenizer, chat template, generation config, VLM processor.

    ``AutoTokenizer`` (and ``AutoProcessor`` with an image processor when the model is a VLM:
    ``is_vlm``, or when None, ``vision_config`` in ``config.json``) load from the directory
    alone; a chat template renders a one-turn conversation; ``generation_config.json`` loads.
    """
    from transformers import AutoProcessor, AutoTokenizer, GenerationConfig

    root = inputs.export.root
    is_vlm = inputs.is_vlm
    if is_vlm is None:
        is_vlm = "vision_config" in inputs.export.json("config.json")
    issues: list[Issue] = []
    loaded: dict[str, Any] = {}
    loaders: dict[str, Callable[[], Any]] = {
        "tokenizer": lambda: AutoTokenizer.from_pretrained(root, local_files_only=True),
        "generation_config.json": lambda: GenerationConfig.from_pretrained(
            root, local_files_only=True
        ),
    }
    if is_vlm:
        loaders["processor"] = lambda: AutoProcessor.from_pretrained(root, local_files_only=True)
    for what, load in loaders.items():
        try:
            loaded[what] = load()
        except Exception as err:  # noqa: BLE001 - any loader failure is this rule's finding
            issues.append(Issue(what, f"does not load: {type(err).__name__}: {err}"))
    if "processor" in loaded and not hasattr(loaded["processor"], "image_processor"):
        kind = type(loaded["processor"]).__name__
        issues.append(Issue("processor", f"AutoProcessor gave a {kind}, not an image processor"))
    tokenizer = loaded.get("tokenizer")
    if tokenizer is not None:
        if not getattr(tokenizer, "chat_template", None):
            issues.append(Issue("chat_template", "the tokenizer has no chat template"))
        else:
            conversation = [{"role": "user", "content": "hello"}]
            try:
                tokenizer.apply_chat_template(
                    conversation, tokenize=False, add_generation_prompt=True
                )
            except Exception as err:  # noqa: BLE001 - a template that fails to render is a finding
                message = f"does not render: {type(err).__name__}: {err}"
                issues.append(Issue("chat_template", message))
    return issues


def check_kv_cache(inputs: AuditInputs) -> list[Issue]:
    """The declared formats and KV cache are the recipe's (reference: NVFP4, group 16, fp8_cast KV cache).

    ``hf_quant_config.json`` ``quant_algo`` names the one format of the quantized linears, or
    ``MIXED_PRECISION`` with every one of them in ``quantized_layers``
    (``tasks.audit_formats.declared_algo_problems``), and ``config.json``'s ``quantization_config``
    says the same ``quant_algo``. With ``kv_cache: fp8_cast``: ``kv_cache_quant_algo`` FP8 and
    ``kv_cache_scheme`` 8-bit float; with ``none``: neither. With ``use_constant_amax`` the K/V
    quantizers of modelopt 0.47 register no ``_amax`` buffer, so its export writes no
    ``k_proj.k_scale``/``v_proj.v_scale`` (a calibrated FP8 KV cache writes amax / 448 there);
    engines then use scale 1.0, which is amax 448. Any K/V scale or bias tensor therefore means
    the K/V cache was calibrated.
    """
    export = inputs.export
    section = export.quantization()
    algos = {module: algo for module, algo in inputs.quantized_algos().items() if algo is not None}
    issues = [Issue(where, message) for where, message in declared_algo_problems(section, algos)]
    fp8_kv = inputs.expected.kv_cache == "fp8_cast"
    if (got := section.get("kv_cache_quant_algo")) != ("FP8" if fp8_kv else None):
        issues.append(Issue(QUANT_CONFIG_FILE, f"quantization.kv_cache_quant_algo is {got!r}, not "
                                               f"{'FP8' if fp8_kv else None!r} (recipe kv_cache {inputs.expected.kv_cache})"))
    mirror = export.json("config.json").get("quantization_config")
    mirror = mirror if isinstance(mirror, dict) else {}
    if mirror.get("quant_algo") != section.get("quant_algo"):
        issues.append(
            Issue("config.json", f"quantization_config.quant_algo is {mirror.get('quant_algo')!r}, "
                                 f"hf_quant_config.json says {section.get('quant_algo')!r}")
        )
    scheme = mirror.get("kv_cache_scheme")
    if fp8_kv and (not isinstance(scheme, dict) or (scheme.get("num_bits"), scheme.get("type")) != (8, "float")):
        issues.append(Issue(
            "config.json", f"quantization_config.kv_cache_scheme is {scheme!r}, not 8-bit float"
        ))
    elif not fp8_kv and scheme is not None:
        issues.append(Issue("config.json", f"quantization_config.kv_cache_scheme is {scheme!r}; the recipe has none"))
    issues += [
        Issue(name, "K/V cache scale or bias present: K/V was calibrated, not fp8_cast")
        for name in export.tensors
        if name.endswith(KV_TENSOR_SUFFIXES)
    ]
    return issues


RULES: dict[str, Callable[[AuditInputs], list[Issue]]] = {
    "quantized-linear-format": check_quantized_linear_format,
    "exclusions": check_exclusions,
    "fused-siblings": check_fused_siblings,
    "mtp-preserved": check_mtp_preserved,
    "loadable": check_loadable,
    "kv-cache": check_kv_cache,
}
