"""Both branches on one model load, and the fast statistics path, against plain ModelOpt.

The tiny Qwen3.5 VLM runs the real image-text loop (full VLM forward) and the text loop. Each
branch's state from one :func:`tasks.calibrate.calibrate` call with both branches (one load,
second branch re-calibrated from a clean slate) must equal, bit for bit, the state a call with
that branch alone writes on a model of its own: every amax, the enabled input quantizers and the
whole ModelOpt state (quantizer properties included).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conf.schema import BaseModelSpec, ImageTextSource, RecipeSpec, TextSource
from quantdag.model import loading as modeling
from quantdag.model import warm
from quantdag.model.loading import resolve_base
from quantdag.calibration.quantizer_state import STATE_FILE, load_state
from quantdag.calibration.recipe import build_quant_config
from quantdag.runtime.store import ArtifactStore
from quantdag.calibration.fast_max import fast_max_loop, fast_max_statistics
from tasks.calibrate import branch_label, calibrate, calibration_calls, run_name
from tasks.fetch import fetch_image_text, fetch_text
from tiny_models import write_tiny_llama

KINDS = ("image_text", "text")


def differences(a: Any, b: Any, path: str = "state") -> list[str]:
    """Every place where two nested states differ (tensors: dtype, shape and bits)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only on one side" for k in sorted(set(a) ^ set(b), key=str)]
        for key in sorted(set(a) & set(b), key=str):
            out += differences(a[key], b[key], f"{path}.{key}")
        return out
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [f"{path}: {a!r} vs {b!r}"]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    return [] if same else [f"{path}: {a!r} vs {b!r}"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    from quantdag.demo.workspace import build_demo_workspace

    root = build_demo_workspace(tmp_path_factory.mktemp("shared-calib") / "demo")
    store = ArtifactStore(str(root.parent / "store"))
    sources = {
        "image_text": ImageTextSource(path=str(root / "nemotron-vlm-mirror"), num_samples=3,
                                      max_image_pixels=128 * 128, max_text_tokens=48),
        "text": TextSource(path=str(root / "cnn_dailymail" / "train.jsonl"), num_samples=3, seq_len=48),
    }
    rows = {"image_text": fetch_image_text(sources["image_text"], store), "text": fetch_text(sources["text"], store)}
    return resolve_base(BaseModelSpec(local_dir=str(root / "model"))), store, sources, rows


@pytest.fixture(scope="module")
def states(demo) -> dict[str, dict[str, dict[str, Any]]]:
    """Per variant (separate, shared, shared_fast), per branch: the stored state."""
    base, store, sources, rows = demo

    def read(ref) -> dict[str, Any]:
        return load_state(store.local_dir(ref) / STATE_FILE)

    def fresh(*args, **kwargs):  # each call from the files, not from the model an earlier call kept
        warm.release()
        return calibrate(*args, **kwargs)

    out = {"separate": {kind: read(fresh(base, {kind: rows[kind]}, RecipeSpec(), {kind: sources[kind]}, store,
                                         "cpu")[kind])
                        for kind in KINDS}}
    for variant, fast in (("shared", False), ("shared_fast", True)):
        refs = fresh(base, rows, RecipeSpec(), sources, store, "cpu", fast=fast)
        assert list(refs) == list(KINDS), f"one state per branch, in branch order: {list(refs)}"
        assert refs["image_text"].meta["model_loads"] == 1 and refs["text"].meta["model_loads"] == 0
        out[variant] = {kind: read(ref) for kind, ref in refs.items()}
    return out


@pytest.mark.parametrize("variant", ["shared", "shared_fast"])
@pytest.mark.parametrize("kind", KINDS)
def test_branch_state_equals_its_separate_calibration(states, variant: str, kind: str) -> None:
    separate, candidate = states["separate"][kind], states[variant][kind]
    assert separate["input_quantizers"], "the tiny model must have calibrated input quantizers"
    found = differences(separate, candidate)
    assert not found, f"{variant} {kind} state differs from a separate calibration in {len(found)} places: {found[:5]}"


def test_branches_really_differ(states) -> None:
    image, text = states["separate"]["image_text"], states["separate"]["text"]
    differ = [n for n in image["input_quantizers"] if not torch.equal(image["amax"][n], text["amax"][n])]
    assert differ, "image-text and text rows gave identical input amax: the comparison would prove nothing"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    """A resolved tiny 2-layer Llama base (text only)."""
    return resolve_base(BaseModelSpec(local_dir=str(write_tiny_llama(tmp_path_factory.mktemp("llama")))))


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(4, 40, (1, 24), generator=generator) for _ in range(3)]


def _quantize(base, loop) -> torch.nn.Module:
    import modelopt.torch.quantization as mtq

    model = modeling.load_model(base, torch.device("cpu")).model.float()
    return mtq.quantize(model, build_quant_config(RecipeSpec()), forward_loop=loop)


@pytest.mark.parametrize("fast", [True, False])
def test_fast_path_never_reads_weights_during_the_loop(llama, fast: bool) -> None:
    from contextlib import nullcontext

    from modelopt.torch.quantization.nn import TensorQuantizer

    calls = {"weight": 0, "fast_linears": 0}

    def loop(model: torch.nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, TensorQuantizer) and name.endswith("weight_quantizer") and not module._disabled:
                module.register_forward_hook(lambda *_: calls.__setitem__("weight", calls["weight"] + 1))
        with fast_max_statistics(model) if fast else nullcontext(0) as patched, torch.no_grad():
            calls["fast_linears"] = patched
            for ids in _batches():
                model(input_ids=ids)

    model = _quantize(llama, loop)
    if not fast:  # the contrast: ModelOpt's forward re-reads every weight on every batch
        assert calls["weight"] == 2 * 7 * len(_batches()), calls
        return
    assert calls["fast_linears"] == 2 * 7 + 1, "every linear (q/k/v/o/gate/up/down, lm_head) takes the fast path"
    assert calls["weight"] == 0, f"enabled weight quantizers ran {calls['weight']} times during the data loop"
    assert "forward" not in model.model.layers[0].mlp.down_proj.__dict__, "the fast forward was not removed"


def test_fast_and_plain_modelopt_agree_on_a_causal_lm(llama) -> None:
    def loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for ids in _batches():
                model(input_ids=ids)

    from quantdag.calibration.quantizer_state import collect_state

    plain, fast = collect_state(_quantize(llama, loop)), collect_state(_quantize(llama, fast_max_loop(loop)))
    found = differences(plain, fast)
    assert not found, f"fast statistics differ from ModelOpt's in {len(found)} places: {found[:5]}"


def test_non_finite_inputs_name_the_modules(llama) -> None:
    def loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            model.model.embed_tokens.weight[5] = float("nan")
            model(input_ids=torch.tensor([[5, 6, 7]]))

    with pytest.raises(ValueError, match=r"NaN or inf at \d+ modules: \['model\.layers\.0\."):
        _quantize(llama, fast_max_loop(loop))


def test_unknown_branch_is_rejected(demo) -> None:
    base, store, sources, rows = demo
    with pytest.raises(ValueError, match="unknown calibration kind 'audio'"):
        calibrate(base, {"audio": rows["text"]}, RecipeSpec(), {"audio": sources["text"]}, store, "cpu")
    with pytest.raises(ValueError, match="branch 'image_text' has rows but no source"):
        calibrate(base, rows, RecipeSpec(), {"text": sources["text"]}, store, "cpu")
    with pytest.raises(ValueError, match=r"'audio', which has no rows; text: shard 2 is outside range\(num_shards=2\)"):
        calibrate(base, rows, RecipeSpec(), sources, store, "cpu", shards={"text": (2, 2), "audio": (0, 1)})


@pytest.mark.parametrize(("shards", "gpus", "expected"), [
    ({"image_text": 1, "text": 1}, 1, [{"image_text": (0, 1), "text": (0, 1)}]),
    ({"text": 1}, 1, [{"text": (0, 1)}]),
    ({"image_text": 1, "text": 1}, 2, [{"image_text": (0, 1)}, {"text": (0, 1)}]),
    ({"image_text": 1, "text": 2}, 1, [{"image_text": (0, 1)}, {"text": (0, 2)}, {"text": (1, 2)}]),
    ({"image_text": 1, "text": 2}, 4, [{"image_text": (0, 1)}, {"text": (0, 2)}, {"text": (1, 2)}]),
])
def test_calibration_calls_share_one_load_only_on_one_gpu_without_shards(shards, gpus, expected) -> None:
    assert calibration_calls(shards, gpus) == expected


def test_labels_and_task_run_names_say_what_ran() -> None:
    assert branch_label("text") == "text" and branch_label("text", 1, 2) == "text[1]"
    both = {"rows": {"image_text": None, "text": None}, "shards": {"image_text": (0, 1), "text": (0, 1)}}
    assert run_name(parameters=both) == "calibrate_image_text+text"
    assert run_name(parameters={"rows": {"text": None}, "shards": {"text": (1, 3)}}) == "calibrate_text[1]"
    assert run_name(parameters={"rows": {"image_text": None}, "shards": None}) == "calibrate_image_text"
