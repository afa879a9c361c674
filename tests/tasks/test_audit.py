"""tasks/audit.py: good NVFP4 exports pass; one built to break a rule fails and names the module.

Two good checkpoints (see audit_fixtures.py): a real ModelOpt export of a tiny Llama and a
hand-written Qwen3.5 layout (Gated DeltaNet, vision tower, MTP head, processor, sharded files).
Each test edits a copy of one of them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import audit_fixtures as fx
import pytest
import torch

from tasks.audit import (
    RULES,
    AuditError,
    AuditReport,
    audit_checkpoint,
    audit_task,
    require_passed,
)

L0 = "model.layers.0"
Q0 = f"{fx.LM}.layers.0"  # Gated DeltaNet layer of the Qwen3.5 checkpoint
Q1 = f"{fx.LM}.layers.1"  # full-attention layer


@pytest.fixture(scope="session")
def llama_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return fx.build_llama_export(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def qwen_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return fx.build_qwen35_export(tmp_path_factory.mktemp("qwen35"))


def _copy(source: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    export, base = source
    return (Path(shutil.copytree(export, tmp_path / "export")),
            Path(shutil.copytree(base, tmp_path / "base")))


@pytest.fixture
def llama(llama_source: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """``(export_dir, base_dir)``: a fresh copy of the ModelOpt Llama export and its base."""
    return _copy(llama_source, tmp_path)


@pytest.fixture
def qwen(qwen_source: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """``(export_dir, base_dir)``: a fresh copy of the Qwen3.5-layout export and its base."""
    return _copy(qwen_source, tmp_path)


def assert_fails(report: AuditReport, rule: str, *modules: str) -> None:
    """The report fails under ``rule`` only, and names each of ``modules`` under it."""
    assert not report.passed
    assert {f.rule for f in report.findings} == {rule}, report.findings
    named = {f.module for f in report.findings}
    assert set(modules) <= named, f"expected {modules} among {sorted(named)}"


# ----------------------------------------------------------------------------- good checkpoints
def test_modelopt_llama_export_passes(llama: tuple[Path, Path]) -> None:
    report = audit_checkpoint(*llama)
    assert report.passed, report.findings
    assert report.counts == {"tensors": 63, "quantized_linears": 14, "unquantized_linears": 1,
                             "base_mtp_tensors": 0}
    assert require_passed(report) is report


def test_qwen35_export_passes(qwen: tuple[Path, Path]) -> None:
    report = audit_checkpoint(*qwen)
    assert report.passed, report.findings
    assert report.counts["quantized_linears"] == 13
    assert report.counts["base_mtp_tensors"] == 12


def test_audit_reads_headers_and_only_the_tensors_it_checks(
    qwen: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No model is built: tensors are read one by name, and only NVFP4 scales and ``mtp.*``."""
    import transformers

    from quantdag.format.checkpoint import TensorReader

    read: list[str] = []
    original = TensorReader.__getitem__

    def record(self: TensorReader, name: str) -> torch.Tensor:
        read.append(name)
        return original(self, name)

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the audit built a model")

    monkeypatch.setattr(TensorReader, "__getitem__", record)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_model))
    assert audit_checkpoint(*qwen).passed
    assert any(n.startswith("mtp.") for n in read) and any(n.endswith("_scale") for n in read)
    scales = ("weight_scale", "weight_scale_2", "input_scale")
    unexpected = sorted({n for n in read if not (n.startswith("mtp.") or n.endswith(scales))})
    assert not unexpected, f"the audit read tensors no rule checks: {unexpected}"


def test_rules_registry_has_every_rule() -> None:
    assert list(RULES) == ["quantized-linear-format", "exclusions", "fused-siblings",
                           "mtp-preserved", "loadable", "kv-cache"]


def test_modelopt_qwen35_export_passes_once_mtp_is_declared(tmp_path: Path) -> None:
    """ModelOpt 0.47 writes ``extra_state_dict`` tensors but does not add them to the excludes."""
    export, base = fx.build_modelopt_qwen35_export(tmp_path)
    report = audit_checkpoint(export, base)
    assert_fails(report, "exclusions", "mtp.fc", "mtp.layers.0.mlp.gate_proj")
    fx.edit_excludes(export, lambda patterns: [*patterns, "mtp.*"])
    report = audit_checkpoint(export, base)
    assert report.passed, report.findings
    assert report.counts["base_mtp_tensors"] == 3


# ----------------------------------------------------------------------- quantized-linear-format
def _nan_fp8(tensor: torch.Tensor) -> torch.Tensor:
    broken = tensor.clone()
    broken.view(torch.uint8)[0, 0] = 0x7F  # E4M3FN NaN
    return broken


LLAMA_FORMAT_BREAKS = {
    "weight-int8": lambda t, m: t.__setitem__(f"{m}.weight", t[f"{m}.weight"].view(torch.int8)),
    "weight-unpacked": lambda t, m: t.__setitem__(
        f"{m}.weight", t[f"{m}.weight"].repeat(1, 2)),
    "scale-float32": lambda t, m: t.__setitem__(
        f"{m}.weight_scale", t[f"{m}.weight_scale"].float()),
    "scale-shape": lambda t, m: t.__setitem__(f"{m}.weight_scale", t[f"{m}.weight_scale"][:, :-1]),
    "scale-nan": lambda t, m: t.__setitem__(f"{m}.weight_scale", _nan_fp8(t[f"{m}.weight_scale"])),
    "input-scale-zero": lambda t, m: t.__setitem__(f"{m}.input_scale", torch.tensor(0.0)),
    "scale-2-inf": lambda t, m: t.__setitem__(f"{m}.weight_scale_2", torch.tensor(float("inf"))),
    "scale-2-bf16": lambda t, m: t.__setitem__(
        f"{m}.weight_scale_2", t[f"{m}.weight_scale_2"].bfloat16()),
    "input-scale-missing": lambda t, m: t.pop(f"{m}.input_scale"),
}


@pytest.mark.parametrize("break_name", list(LLAMA_FORMAT_BREAKS))
def test_format_rule_names_the_broken_module(llama: tuple[Path, Path], break_name: str) -> None:
    export, base = llama
    module = f"{L0}.mlp.down_proj"  # no fused siblings: only the format rule can fail
    fx.edit_tensors(export, lambda t: LLAMA_FORMAT_BREAKS[break_name](t, module))
    assert_fails(audit_checkpoint(export, base), "quantized-linear-format", module)


def test_format_rule_checks_shapes_against_the_base(qwen: tuple[Path, Path]) -> None:
    export, base = qwen
    module = f"{Q0}.linear_attn.out_proj"  # [64, 32] in the base; packed [64, 16] in the export

    def shrink(tensors: dict[str, torch.Tensor]) -> None:  # consistent with in=16, not with base
        tensors[f"{module}.weight"] = tensors[f"{module}.weight"][:, :8].clone()
        tensors[f"{module}.weight_scale"] = tensors[f"{module}.weight_scale"][:, :1].clone()

    fx.edit_tensors(export, shrink)
    report = audit_checkpoint(export, base)
    assert_fails(report, "quantized-linear-format", module)
    assert "expected U8[64, 16]" in report.findings[0].message


def test_format_rule_flags_packed_weight_without_block_scales(llama: tuple[Path, Path]) -> None:
    export, base = llama
    module = f"{L0}.self_attn.o_proj"
    fx.edit_tensors(export, lambda t: t.pop(f"{module}.weight_scale"))
    report = audit_checkpoint(export, base)
    assert ("quantized-linear-format", module) in {(f.rule, f.module) for f in report.findings}


# ------------------------------------------------------------------------------------ exclusions
def test_exclusions_rule_flags_an_undeclared_bf16_linear(llama: tuple[Path, Path]) -> None:
    export, base = llama
    fx.edit_excludes(export, lambda patterns: [p for p in patterns if p != "lm_head"])
    assert_fails(audit_checkpoint(export, base), "exclusions", "lm_head")


def test_exclusions_rule_flags_an_undeclared_dequantized_linear(llama: tuple[Path, Path]) -> None:
    export, base = llama
    module = f"{L0}.mlp.down_proj"
    fx.edit_tensors(export, lambda t: fx.dequantize_to_bf16(t, module))
    assert_fails(audit_checkpoint(export, base), "exclusions", module)


def test_exclusions_rule_flags_an_excluded_module_with_scales(llama: tuple[Path, Path]) -> None:
    export, base = llama
    module = f"{L0}.mlp.down_proj"
    fx.edit_excludes(export, lambda patterns: [*patterns, module])
    assert_fails(audit_checkpoint(export, base), "exclusions", module)


def test_exclusions_rule_flags_config_json_disagreeing(llama: tuple[Path, Path]) -> None:
    export, base = llama
    fx.edit_json(export / "config.json",
                 lambda c: c["quantization_config"]["ignore"].append("model.layers.1.*"))
    report = audit_checkpoint(export, base)
    assert_fails(report, "exclusions", "config.json")
    assert "model.layers.1.*" in report.findings[0].message


def test_exclusions_rule_catches_an_mtp_pattern_that_misses_mtp_fc(qwen: tuple[Path, Path]) -> None:
    export, base = qwen  # a narrow "mtp.layers.0*" leaves the BF16 mtp.fc to be loaded as NVFP4
    fx.edit_excludes(export, lambda ps: ["mtp.layers.0*" if p == "mtp.*" else p for p in ps])
    report = audit_checkpoint(export, base)
    assert_fails(report, "exclusions", "mtp.fc")
    assert [f.module for f in report.findings] == ["mtp.fc"]


# -------------------------------------------------------------------------------- fused-siblings
def test_fused_rule_flags_q_quantized_with_v_excluded(llama: tuple[Path, Path]) -> None:
    export, base = llama
    module = f"{L0}.self_attn.v_proj"
    fx.edit_tensors(export, lambda t: fx.dequantize_to_bf16(t, module))
    fx.edit_excludes(export, lambda patterns: [*patterns, module])
    report = audit_checkpoint(export, base)
    assert_fails(report, "fused-siblings", f"{L0}.self_attn.qkv_proj [q_proj, k_proj, v_proj]")
    assert "unquantized ['v_proj']" in report.findings[0].message


def test_fused_rule_flags_siblings_with_different_input_scale(llama: tuple[Path, Path]) -> None:
    export, base = llama
    name = f"{L0}.self_attn.k_proj.input_scale"
    fx.edit_tensors(export, lambda t: t.__setitem__(name, t[name] * 2))
    assert_fails(audit_checkpoint(export, base), "fused-siblings",
                 f"{L0}.self_attn.qkv_proj [q_proj, k_proj, v_proj]")


def test_fused_rule_flags_gated_deltanet_qkvz_scale_mismatch(qwen: tuple[Path, Path]) -> None:
    export, base = qwen
    name = f"{Q0}.linear_attn.in_proj_z.weight_scale_2"
    fx.edit_tensors(export, lambda t: t.__setitem__(name, torch.nextafter(t[name], t[name] + 1)))
    report = audit_checkpoint(export, base)
    assert_fails(report, "fused-siblings",
                 f"{Q0}.linear_attn.in_proj_qkvz [in_proj_qkv, in_proj_z]")
    assert "weight_scale_2 differs" in report.findings[0].message


def test_fused_rule_flags_in_proj_a_quantized_but_b_not(qwen: tuple[Path, Path]) -> None:
    export, base = qwen
    module = f"{Q0}.linear_attn.in_proj_a"
    fx.edit_excludes(export, lambda ps: [p for p in ps if p != "*linear_attn.in_proj_a*"])
    fx.edit_tensors(export, lambda t: t.update(
        {f"{module}.{k}": v for k, v in fx.fake_nvfp4(
            t.pop(f"{module}.weight"), 1e-4, 2e-3, torch.Generator().manual_seed(0)).items()}))
    assert_fails(audit_checkpoint(export, base), "fused-siblings",
                 f"{Q0}.linear_attn.in_proj_ba [in_proj_b, in_proj_a]")


def test_require_passed_lists_every_offending_group(qwen: tuple[Path, Path]) -> None:
    export, base = qwen
    names = [f"{Q0}.mlp.up_proj.input_scale", f"{Q1}.mlp.up_proj.input_scale",
             f"{Q1}.self_attn.v_proj.input_scale"]
    fx.edit_tensors(export, lambda t: t.update({n: t[n] * 3 for n in names}))
    report = audit_checkpoint(export, base)
    with pytest.raises(AuditError) as raised:
        require_passed(report)
    message = str(raised.value)
    assert "[fused-siblings] 3 failing" in message
    for group in (f"{Q0}.mlp.gate_up_proj", f"{Q1}.mlp.gate_up_proj", f"{Q1}.self_attn.qkv_proj"):
        assert group in message
    assert isinstance(raised.value, ValueError)


# --------------------------------------------------------------------------------- mtp-preserved
def test_mtp_rule_flags_a_one_bit_change(qwen: tuple[Path, Path]) -> None:
    export, base = qwen

    def flip(tensors: dict[str, torch.Tensor]) -> None:
        weight = tensors["mtp.layers.0.mlp.down_proj.weight"].clone()
        weight.view(torch.int16).view(-1)[5] ^= 1
        tensors["mtp.layers.0.mlp.down_proj.weight"] = weight

    fx.edit_tensors(export, flip)
    report = audit_checkpoint(export, base)
    assert_fails(report, "mtp-preserved", "mtp.layers.0.mlp.down_proj.weight")
    assert "1 of " in report.findings[0].message


def test_mtp_rule_flags_missing_and_recast_tensors(qwen: tuple[Path, Path]) -> None:
    export, base = qwen

    def damage(tensors: dict[str, torch.Tensor]) -> None:
        del tensors["mtp.norm.weight"]
        tensors["mtp.pre_fc_norm_hidden.weight"] = tensors["mtp.pre_fc_norm_hidden.weight"].float()

    fx.edit_tensors(export, damage)
    assert_fails(audit_checkpoint(export, base), "mtp-preserved",
                 "mtp.norm.weight", "mtp.pre_fc_norm_hidden.weight")


def test_mtp_rule_reads_an_unsharded_base(qwen: tuple[Path, Path]) -> None:
    export, base = qwen
    tensors, _ = fx.read_tensors(base)
    fx.write_tensors(base, tensors)  # one model.safetensors, no index
    assert audit_checkpoint(export, base).passed
    fx.edit_tensors(export, lambda t: t.__setitem__("mtp.fc.weight", t["mtp.fc.weight"] * 2))
    assert_fails(audit_checkpoint(export, base), "mtp-preserved", "mtp.fc.weight")


# -------------------------------------------------------------------------------------- loadable
@pytest.mark.parametrize(("deleted", "module"), [
    ("tokenizer.json", "tokenizer"),
    ("generation_config.json", "generation_config.json"),
    ("chat_template.jinja", "chat_template"),
])
def test_loadable_rule_flags_missing_side_files(llama: tuple[Path, Path], deleted: str,
                                                module: str) -> None:
    export, base = llama
    (export / deleted).unlink()
    assert_fails(audit_checkpoint(export, base), "loadable", module)


def test_loadable_rule_needs_the_processor_of_a_vlm(qwen: tuple[Path, Path]) -> None:
    export, base = qwen
    (export / "processor_config.json").unlink()
    assert_fails(audit_checkpoint(export, base), "loadable", "processor")
    assert audit_checkpoint(export, base, is_vlm=False).passed


# -------------------------------------------------------------------------------------- kv-cache
def test_kv_rule_flags_a_k_scale_tensor(llama: tuple[Path, Path]) -> None:
    export, base = llama
    name = f"{L0}.self_attn.k_proj.k_scale"
    fx.edit_tensors(export, lambda t: t.__setitem__(name, torch.tensor(1.0)))
    assert_fails(audit_checkpoint(export, base), "kv-cache", name)


@pytest.mark.parametrize(("key", "value"), [
    ("kv_cache_quant_algo", None), ("kv_cache_quant_algo", "NVFP4"), ("quant_algo", "FP8"),
    ("group_size", 32),
])
def test_kv_rule_checks_the_declared_algorithms(qwen: tuple[Path, Path], key: str,
                                                value: object) -> None:
    export, base = qwen
    fx.edit_json(export / "hf_quant_config.json", lambda c: c["quantization"].update({key: value}))
    report = audit_checkpoint(export, base)
    assert_fails(report, "kv-cache", "hf_quant_config.json")
    assert f"quantization.{key} is {value!r}" in report.findings[0].message


def test_kv_rule_rejects_a_real_calibrated_fp8_kv_export(tmp_path: Path) -> None:
    """ModelOpt writes ``k_proj.k_scale``/``v_proj.v_scale`` only when K/V are calibrated."""
    export, base = fx.build_llama_export(tmp_path, kv_cache="calibrated")
    report = audit_checkpoint(export, base)
    scales = [f"model.layers.{i}.self_attn.{kv}_proj.{kv}_scale" for i in (0, 1) for kv in "kv"]
    assert_fails(report, "kv-cache", *scales)
    assert len(report.findings) == 4


# ----------------------------------------------------------------------------- inputs and files
def test_missing_quant_config_is_a_finding_not_a_crash(llama: tuple[Path, Path]) -> None:
    export, base = llama
    (export / "hf_quant_config.json").unlink()
    report = audit_checkpoint(export, base)
    assert {(f.rule, f.module) for f in report.findings} == {
        ("exclusions", "export:hf_quant_config.json"), ("kv-cache", "export:hf_quant_config.json")}


def test_an_index_naming_an_absent_tensor_is_a_finding(qwen: tuple[Path, Path]) -> None:
    export, base = qwen
    first_shard = "model-00001-of-00002.safetensors"
    fx.edit_json(export / "model.safetensors.index.json",
                 lambda index: index["weight_map"].update({"mtp.extra.weight": first_shard}))
    report = audit_checkpoint(export, base)
    assert not report.passed
    assert {f.module for f in report.findings} == {f"export:{first_shard}"}


def test_a_missing_directory_is_a_value_error(llama: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="export_dir"):
        audit_checkpoint(tmp_path / "absent", llama[1])


def test_a_base_without_safetensors_skips_the_mtp_comparison(llama: tuple[Path, Path]) -> None:
    assert audit_checkpoint(llama[0], None).passed


# ---------------------------------------------------------------------------------- Prefect task
def test_audit_task_stores_the_report_and_raises_on_findings(
    llama: tuple[Path, Path], tmp_path: Path
) -> None:
    from quantdag.model.loading import BaseRef
    from quantdag.runtime.store import ArtifactStore

    export, base = llama
    store = ArtifactStore(str(tmp_path / "store"))
    base_ref = BaseRef(source_dir=str(base), repo_id=None, revision="main", revision_sha=None,
                       fingerprint="f", is_vlm=False, model_type="llama")
    ref = audit_task.fn(base_ref, store.put_dir(export, "checkpoint"), store.root, "test")
    report = AuditReport.model_validate_json((Path(ref.uri) / "audit_report.json").read_text())
    assert report.passed and ref.meta["passed"] is True
    (export / "tokenizer.json").unlink()
    with pytest.raises(AuditError, match=r"\[loadable\] 1 failing: tokenizer"):
        audit_task.fn(base_ref, store.put_dir(export, "checkpoint"), store.root, "test")
