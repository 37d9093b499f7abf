"""PEFT BOFT and OFT interop (boft_jax.interop): outputs equal PEFT's, round trips, merged export, CLI, errors.

The references come from PyTorch PEFT / transformers via tests/fixtures/make_peft_fixtures.py (with
a CPU block-diagonal op substituted for PEFT's CUDA extension, so that PEFT really runs m > 1
butterfly factors); no torch is needed here.
"""

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import boft_jax as boft
from boft_jax.interop import load_peft_adapter, save_peft_adapter
from boft_jax.interop import peft as peft_io
from boft_jax.interop.__main__ import export_merged, main
from boft_jax.models import hf, t5, vit
from reference import np_skew_from_packed

FIXTURES = Path(__file__).parent / "fixtures"
PEFT = FIXTURES / "peft"
PEFT_ADAPTERS = [
    "vit_m1", "vit_m2_head", "vit_m3_all", "vit_v4_names", "vit_cpu_fallback",
    "t5_relu_m2", "t5_gated_m3_head", "t5_gated_blocknum", "t5_relu_tied_head", "t5_relu_shared",
    # PEFT OFT (BOFT with one factor and no output scale)
    "vit_oft_neumann", "vit_oft_exact_r", "vit_oft_share_coft", "vit_oft_adjusted", "t5_oft_gated", "t5_oft_lm_head",
    "mt5_oft_mixed",
    # made on a bare ViTModel (no classifier, no "vit." in the module names): loaded as a headless ViT
    "vit_bare_m2",
]
OURS = ["ours_vit", "ours_t5", "ours_vit_oft", "ours_t5_oft", "ours_vit_bare"]
TOL = 1e-5  # float32: max |ours - reference| <= TOL * max(1, max |reference|), as in the model tests


def assert_close(actual, reference, tol=TOL):
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    err, scale = np.abs(actual - reference).max(), max(1.0, np.abs(reference).max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} * {scale:.3g}"
    return err


@functools.lru_cache(maxsize=None)
def base(name: str, scan_layers: bool = False, num_labels=None):
    if name == "vit_bare":  # a ViTModel checkpoint: headless (it returns the final CLS features)
        return vit.from_pretrained(FIXTURES / name, scan_layers=scan_layers, num_labels=0)
    if name == "vit":
        return vit.from_pretrained(FIXTURES / "vit", scan_layers=scan_layers, num_labels=num_labels)
    return t5.from_pretrained(FIXTURES / name, scan_layers=scan_layers)


def reference(name: str) -> dict:
    return dict(np.load(PEFT / f"{name}.npz", allow_pickle=False))


def run(model, params, ref):
    if "pixel_values" in ref:
        return model.apply({"params": params}, ref["pixel_values"])
    return model.apply({"params": params}, ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])


def load(name, scan_layers=False):
    module, params = base(str(reference(name)["base"]), scan_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vit_cpu_fallback warns (tested separately)
        return load_peft_adapter(PEFT / name, module, params)


def copy_fixture(name, tmp_path) -> Path:
    dst = tmp_path / name
    shutil.copytree(PEFT / name, dst)
    return dst


def edit_tensors(path: Path, fn):
    file = path / peft_io.ADAPTER_WEIGHTS_NAME
    tensors = fn(dict(load_file(file)))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, file)


def edit_config(path: Path, **changes):
    file = path / peft_io.ADAPTER_CONFIG_NAME
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


def flat_adapter(params, config):
    return hf.flatten_params(boft.split(params, config)[1])


# ---------------------------------------------------------------------------------------------
# Outputs equal PEFT's
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PEFT_ADAPTERS)
def test_outputs_match_peft(name):
    ref = reference(name)
    model, params = load(name)
    assert model.config.n_factors == int(ref["n_factors"])
    out = run(model, params, ref)
    assert_close(out, ref["outputs"])  # PEFT in float32
    assert_close(out, ref["outputs_f64"])  # PEFT in float64: the exact value
    # ... and no less accurate than PEFT's own float32 result.
    assert np.abs(out - ref["outputs_f64"]).max() <= 2 * np.abs(ref["outputs"] - ref["outputs_f64"]).max() + 1e-6
    # The adapter is far from the identity, so this compares something.
    assert np.abs(ref["outputs"] - ref["base_outputs"]).max() > 0.05


@pytest.mark.parametrize("name", ["vit_m3_all", "t5_gated_m3_head"])
def test_outputs_match_peft_with_scan_layers(name):
    ref = reference(name)
    model, params = load(name, scan_layers=True)
    assert all("layers" in t for t in model.config.targets)
    assert_close(run(model, params, ref), ref["outputs"])


def test_tied_t5_head_in_modules_to_save_becomes_an_untied_scaled_head(tmp_path):
    """Original T5 ties its head to the embedding; PEFT's modules_to_save copy of lm_head is an untied
    head, and the decoder output keeps its d_model**-0.5 scaling (PEFT's outputs: test above)."""
    base_module, base_params = base("t5_relu")
    assert base_module.config.tie_word_embeddings and "lm_head" not in base_params
    model, params = load("t5_relu_tied_head")
    assert not model.model.config.tie_word_embeddings and model.model.config.scale_decoder_outputs
    assert model.config.modules_to_save == ("^lm_head",)
    saved = load_file(PEFT / "t5_relu_tied_head" / peft_io.ADAPTER_WEIGHTS_NAME)
    saved_head = next(v for k, v in saved.items() if k.endswith("lm_head.weight") and ".original_module." not in k)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], saved_head.T)
    assert np.abs(saved_head - np.asarray(base_params["shared"]["embedding"])).max() > 0.05  # a real change
    # the merged export reloads as the same untied, scaled model
    export_merged(PEFT / "t5_relu_tied_head", tmp_path / "m", base=FIXTURES / "t5_relu")
    module, merged = t5.from_pretrained(tmp_path / "m")
    assert (module.config.tie_word_embeddings, module.config.scale_decoder_outputs) == (False, True)
    ref = reference("t5_relu_tied_head")
    assert_close(run(module, merged, ref), ref["outputs"])


def test_t5_shared_embedding_copy_is_not_applied_as_peft_does_not_use_it():
    """PEFT saves a modules_to_save copy of T5's `shared` that its forward never reads; loading it
    warns and leaves the embedding as it is (the outputs equal PEFT's: test above)."""
    module, base_params = base("t5_relu")
    with pytest.warns(UserWarning, match="'shared' embedding; its saved copy .* not applied"):
        model, params = load_peft_adapter(PEFT / "t5_relu_shared", module, base_params)
    np.testing.assert_array_equal(params["shared"]["embedding"], base_params["shared"]["embedding"])
    assert model.config.modules_to_save == ()
    # The copy differs from the embedding, so applying it would change the outputs (the choice matters).
    saved = load_file(PEFT / "t5_relu_shared" / peft_io.ADAPTER_WEIGHTS_NAME)
    copy = next(v for k, v in saved.items() if k.endswith("shared.weight") and ".original_module." not in k)
    ref = reference("t5_relu_shared")
    applied = run(model, {**params, "shared": {"embedding": jnp.asarray(copy)}}, ref)
    assert np.abs(np.asarray(applied) - ref["outputs"]).max() > 0.05


def test_saving_a_t5_shared_embedding_for_peft_warns(tmp_path):
    """The export side of the test above: a copy PEFT would not apply is saved with a warning."""
    module, base_params = base("t5_relu")
    cfg = boft.BOFTConfig(block_size=4, targets=t5.TARGET_PRESETS["attention"], modules_to_save="shared")
    wrapped = boft.wrap(module, cfg)
    ref = reference("t5_relu_shared")
    adapter = boft.init_adapter(wrapped, base_params, ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    with pytest.warns(UserWarning, match="'shared' embedding.*PEFT's T5 forward never reads"):
        save_peft_adapter(tmp_path / "p", wrapped, boft.combine(base_params, adapter))
    assert json.loads((tmp_path / "p" / peft_io.ADAPTER_CONFIG_NAME).read_text())["modules_to_save"] == ["shared"]


def test_config_comes_from_tensors_and_adapter_config():
    cfg = load("vit_m2_head")[0].config
    assert (cfg.block_size, cfg.block_num, cfg.n_factors, cfg.bias, cfg.dropout) == (4, None, 2, "boft_only", 0.0)
    assert cfg.modules_to_save == ("^classifier",)
    assert cfg.targets == tuple(
        f"^encoder/layer_{i}/{m}" for i in range(2) for m in ("attention/query", "attention/value", "mlp/fc1", "mlp/fc2")
    )
    # exact targets: nothing else matches
    assert not cfg.matches("encoder/layer_0/attention/key") and cfg.matches("encoder/layer_1/mlp/fc2")

    cfg = load("vit_m3_all")[0].config
    assert (cfg.n_factors, cfg.bias, cfg.dropout, cfg.modules_to_save) == (3, "all", 0.1, ())


def test_dropout_one_loads_as_peft_accepts_it(tmp_path):
    """PEFT trains and saves boft_dropout = 1.0 (one factor's blocks all identity per step): loaded as
    such, and the forward (no dropout) is the same adapter's."""
    src = copy_fixture("vit_m3_all", tmp_path)
    f = src / peft_io.ADAPTER_CONFIG_NAME
    f.write_text(json.dumps({**json.loads(f.read_text()), "boft_dropout": 1.0}))
    module, params = base(str(reference("vit_m3_all")["base"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped, got = load_peft_adapter(src, module, params)
    assert wrapped.config.dropout == 1.0
    want = load("vit_m3_all")[1]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cfg = load("t5_gated_blocknum")[0].config  # block_num: b = 8 for wi_*, 16 for wo
    assert (cfg.block_size, cfg.block_num, cfg.n_factors) == (None, 4, 2)
    _, params = load("t5_gated_blocknum")
    assert params["encoder"]["layer_0"]["mlp"]["wi_0"]["kernel"].skew.shape == (2, 4, 28)
    assert params["encoder"]["layer_0"]["mlp"]["wo"]["kernel"].skew.shape == (2, 4, 120)
    cfg = load("t5_gated_m3_head")[0].config
    assert cfg.modules_to_save == ("^lm_head",) and len(cfg.targets) == 2 * 7 + 2 * (4 + 4 + 3)


@pytest.mark.parametrize("dropout", [-0.1, 1.5])
def test_dropout_outside_0_1_that_peft_saves_loads_as_0_with_a_warning(dropout, tmp_path):
    """PEFT saves boft_dropout = -0.1 (it drops nothing) and 1.5 (its first training step fails):
    loaded with dropout 0 and a warning naming the field, the same forward."""
    src = copy_fixture("vit_m2_head", tmp_path)
    edit_config(src, boft_dropout=dropout)
    with pytest.warns(UserWarning, match=rf"boft_dropout = {dropout:g} is outside \[0, 1\].*loaded with dropout 0"):
        wrapped, got = load_peft_adapter(src, *base("vit"))
    assert wrapped.config.dropout == 0.0
    ref = reference("vit_m2_head")
    assert_close(run(wrapped, got, ref), ref["outputs"])


@pytest.mark.parametrize("bias", ["lora_only", "oft_only"])
def test_every_only_bias_mode_reads_as_peft_does(bias, tmp_path):
    """PEFT trains the adapted layers' biases for every bias value ending in '_only' and saves them
    as for 'boft_only': such an adapter loads as boft_only, to PEFT's outputs."""
    src = copy_fixture("vit_m2_head", tmp_path)
    assert json.loads((src / peft_io.ADAPTER_CONFIG_NAME).read_text())["bias"] == "boft_only"
    edit_config(src, bias=bias)
    wrapped, got = load_peft_adapter(src, *base("vit"))
    assert wrapped.config.bias == "boft_only"
    ref = reference("vit_m2_head")
    assert_close(run(wrapped, got, ref), ref["outputs"])


def test_nested_modules_to_save_are_refused(tmp_path):
    """PEFT selects modules_to_save by plain string suffix: "embeddings" also selects
    vit.embeddings.patch_embeddings, and PEFT then wraps a copy inside a copy and saves tensors its
    forward never read.  Such a file is refused, naming both modules; a full name selects one."""
    rng = np.random.default_rng()
    keys = {k: v for k, v in load_file(FIXTURES / "vit" / "model.safetensors").items() if k.startswith("vit.embeddings.")}
    perturbed = {f"base_model.model.{k}": (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in keys.items()}
    module, frozen = base("vit")
    for names, nested in [(["embeddings"], True), (["vit.embeddings"], False)]:
        path = tmp_path / names[0]
        shutil.copytree(PEFT / "vit_m2_head", path)
        edit_config(path, modules_to_save=names)
        edit_tensors(path, lambda t: {**{k: v for k, v in t.items() if ".classifier." not in k}, **perturbed})
        if nested:
            with pytest.raises(ValueError, match=r"(?s)nested in each other:\n.*vit\.embeddings contains"
                               r" vit\.embeddings\.patch_embeddings.*full name"):
                load_peft_adapter(path, module, frozen)
            continue
        model, params = load_peft_adapter(path, module, frozen)
        want = perturbed["base_model.model.vit.embeddings.cls_token"]
        np.testing.assert_array_equal(np.asarray(params["embeddings"]["cls_token"]).ravel(), want.ravel())
        assert model.config.modules_to_save == ("^embeddings",)


def test_t5_per_stack_embedding_copies_are_refused(tmp_path):
    """PEFT's modules_to_save=["embed_tokens"] on T5 trains one copy of the shared embedding per stack;
    boft_jax's T5 has one embedding, so the file is refused with that reason (not 'another base model')."""
    path = copy_fixture("t5_relu_m2", tmp_path)
    shared = load_file(FIXTURES / "t5_relu" / "model.safetensors")["shared.weight"]
    rng = np.random.default_rng()
    copies = {f"base_model.model.{s}.embed_tokens.modules_to_save.default.weight":
              (shared + 0.1 * rng.standard_normal(shared.shape)).astype(shared.dtype) for s in ("encoder", "decoder")}
    edit_config(path, modules_to_save=["embed_tokens"])
    edit_tensors(path, lambda t: {**t, **copies})
    module, frozen = base("t5_relu")
    with pytest.raises(ValueError, match=r"(?s)per-stack token embeddings \(decoder\.embed_tokens\.weight,"
                       r" encoder\.embed_tokens\.weight.*cannot represent.*Retrain without 'embed_tokens'"):
        load_peft_adapter(path, module, frozen)


def test_trained_biases_and_saved_modules_are_loaded():
    module, frozen = base("vit")
    _, params = load("vit_m2_head")
    tensors = load_file(PEFT / "vit_m2_head" / peft_io.ADAPTER_WEIGHTS_NAME)
    np.testing.assert_array_equal(
        params["encoder"]["layer_1"]["mlp"]["fc2"]["bias"],
        tensors["base_model.model.vit.layers.1.mlp.fc2.base_layer.bias"],
    )
    np.testing.assert_array_equal(params["classifier"]["kernel"], tensors["base_model.model.classifier.weight"].T)
    assert not np.array_equal(params["classifier"]["kernel"], frozen["classifier"]["kernel"])
    adapter = boft.split(params, load("vit_m2_head")[0].config)[1]
    assert set(adapter) == {"encoder", "classifier"} and set(adapter["classifier"]) == {"kernel", "bias"}
    # bias="all": PEFT also stores a 'modules_to_save'/'original_module' copy; every bias is loaded
    _, params = load("vit_m3_all")
    tensors = load_file(PEFT / "vit_m3_all" / peft_io.ADAPTER_WEIGHTS_NAME)
    np.testing.assert_array_equal(
        params["encoder"]["layer_0"]["layernorm_before"]["bias"], tensors["base_model.model.vit.layers.0.layernorm_before.bias"]
    )


def test_saved_tensors_rounded_to_a_half_precision_base_are_named_in_a_warning():
    """A bf16 base keeps its dtype, so PEFT's float32 biases and saved modules are rounded to bf16:
    a warning names each rounded tensor (and how to avoid it); a float32 base loads them silently."""
    module, frozen = base("vit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say for a float32 base
        load_peft_adapter(PEFT / "vit_m2_head", module, frozen)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), frozen)
    with pytest.warns(UserWarning, match=r"rounded to the base's:") as caught:
        _, params = load_peft_adapter(PEFT / "vit_m2_head", module, half)
    msg = str(caught[0].message)
    assert "classifier/kernel (float32 -> bfloat16)" in msg and "encoder/layer_1/mlp/fc2/bias (float32 -> bfloat16)" in msg
    assert params["classifier"]["kernel"].dtype == jnp.bfloat16


def test_cpu_fallback_adapter_warns_and_uses_the_tensors():
    module, params = base("vit")
    with pytest.warns(UserWarning, match=r"boft_n_butterfly_factor = 2.*hold 1 factor.*n_factors = 1"):
        model, params = load_peft_adapter(PEFT / "vit_cpu_fallback", module, params)
    assert model.config.n_factors == 1



def test_factor_count_that_contradicts_the_tensors_is_refused(tmp_path):
    """A config saying 3 factors over boft_R tensors of 2: not PEFT's CPU fallback (that holds 1), and
    PEFT itself cannot load it; refused, naming both counts."""
    bad = copy_fixture("vit_m2_head", tmp_path)
    edit_config(bad, boft_n_butterfly_factor=3)
    with pytest.raises(ValueError, match=r"boft_n_butterfly_factor = 3, but its boft_R tensors hold 2 factors"):
        load_peft_adapter(bad, *base("vit"))


def test_adapter_tensors_with_nan_or_inf_are_refused(tmp_path):
    """A diverged PEFT run's adapter (NaN / inf in boft_R or boft_s) would make every adapted output
    NaN: refused, naming the tensors and how many entries are bad."""
    bad = copy_fixture("vit_m2_head", tmp_path)

    def poison(t):
        key = sorted(k for k in t if k.endswith("boft_R"))[0]
        r = t[key].copy()
        r.reshape(-1)[np.random.default_rng().integers(r.size)] = np.nan
        scale_key = sorted(k for k in t if k.endswith("boft_s"))[-1]
        s = t[scale_key].copy()
        s.reshape(-1)[:2] = np.inf
        return {**t, key: r, scale_key: s}

    edit_tensors(bad, poison)
    with pytest.raises(ValueError, match=r"2 tensor\(s\) hold NaN or infinite values.*boft_R \(1 of .*boft_s \(2 of"):
        load_peft_adapter(bad, *base("vit"))

def test_v5_names_invert_the_models_aliases():
    """transformers-5 names (vit.HF_KEY_ALIASES_V5) invert vit.HF_KEY_ALIASES and are what transformers 5 uses."""
    keymap = peft_io._KeyMap(base("vit")[0])
    v5 = {keymap.key(p, "transformers5") for p in keymap.shapes}
    assert v5 == set(load_file(FIXTURES / "vit_v5_keys" / "model.safetensors"))
    for p in keymap.shapes:
        assert keymap.path(keymap.key(p, "transformers5")) == p
        assert keymap.path(keymap.key(p, "transformers4")) == p
    t5_map = peft_io._KeyMap(base("t5_gated")[0])
    assert all(t5_map.key(p, "transformers5") == t5_map.key(p, "transformers4") for p in t5_map.shapes)


# ---------------------------------------------------------------------------------------------
# PEFT OFT adapters
# ---------------------------------------------------------------------------------------------
def load_oft(name, tmp_path=None, **config_changes):
    path = PEFT / name
    if config_changes:
        path = copy_fixture(name, tmp_path)
        edit_config(path, **config_changes)
    return load_peft_adapter(path, *base(str(reference(name)["base"])))


def test_oft_config_maps_to_one_factor_boft():
    model, params = load_oft("vit_oft_neumann")
    cfg = model.config
    assert (cfg.block_size, cfg.block_num, cfg.n_factors, cfg.bias) == (4, None, 1, "boft_only")  # oft_only
    # PEFT's default 5-term series is (I + S)(I + S + S^2 + S^3): our Neumann map of -S with 4 terms
    assert (cfg.cayley, cfg.neumann_terms) == ("neumann", 4)
    tensors = load_file(PEFT / "vit_oft_neumann" / peft_io.ADAPTER_WEIGHTS_NAME)
    kernel = params["encoder"]["layer_1"]["mlp"]["fc2"]["kernel"]
    np.testing.assert_array_equal(kernel.skew[0], -tensors["base_model.model.vit.layers.1.mlp.fc2.oft_R.weight"])
    np.testing.assert_array_equal(kernel.scale, np.ones(32, np.float32))  # OFT has no output scale
    assert len(cfg.targets) == 12

    cfg = load_oft("vit_oft_exact_r")[0].config  # r = 4 blocks, exact Cayley: the parameters as they are
    assert (cfg.block_size, cfg.block_num, cfg.cayley, cfg.modules_to_save) == (None, 4, "exact", ("^classifier",))
    assert load_oft("t5_oft_gated")[0].config.neumann_terms == 6  # num_cayley_neumann_terms = 7


def test_oft_neumann_terms_follow_peft_and_the_rotation_is_peft_s():
    """Independent reference: PEFT's series written out (I + 2S + 2S^2 + ... + 2S^(n-2) + S^(n-1); n = 3 and
    4 both give 3 terms in PEFT 0.18-0.21; n = 2 gives I + 2S) equals our rotation of the loaded
    parameters, blocks times blocks."""
    rng = np.random.default_rng(3)
    w = (0.2 * rng.standard_normal((5, 6))).astype(np.float32)
    S = np_skew_from_packed(w, 4)
    with jax.enable_x64(True):
        check_oft_rotations(w, S)


def check_oft_rotations(w, S):
    for n, terms in [(2, 1), (3, 3), (4, 3), (5, 4), (8, 7)]:
        if n == 2:  # PEFT: R = I, then R += 2 S; no further terms
            peft_R = np.eye(4) + 2 * S
        else:
            peft_R = np.eye(4) + 2 * sum(np.linalg.matrix_power(S, j) for j in range(1, terms)) + np.linalg.matrix_power(S, terms)
        opts = peft_io._OftOptions.read({"use_cayley_neumann": True, "num_cayley_neumann_terms": n, "peft_version": "0.21.2"}, "x")
        assert opts.neumann_terms == terms
        _, (skew, scale) = opts.layer(w.astype(np.float32), 20, 7, "x")
        ours = boft.cayley(jnp.asarray(skew[0], jnp.float64), 4, "neumann", neumann_terms=terms)
        np.testing.assert_allclose(ours, peft_R, atol=1e-6)
    exact = peft_io._OftOptions.read({"use_cayley_neumann": False}, "x")
    _, (skew, _) = exact.layer(w.astype(np.float32), 20, 7, "x")
    eye = np.eye(4)
    np.testing.assert_allclose(boft.cayley(jnp.asarray(skew[0], jnp.float64), 4),
                               (eye - S) @ np.linalg.inv(eye + S), atol=1e-6)  # PEFT's solve(I + S, I - S, left=False)


def test_oft_block_share_and_coft(tmp_path):
    with pytest.warns(UserWarning) as record:
        model, params = load_oft("vit_oft_share_coft")
    text = " | ".join(str(w.message) for w in record)
    assert "block_share = true" in text and "coft = true" in text
    skew = params["encoder"]["layer_0"]["attention"]["query"]["kernel"].skew
    assert skew.shape == (1, 4, 28)  # the one shared (1, 28) row copied to the k = 32 / 8 blocks
    np.testing.assert_array_equal(skew[0, 1:], np.broadcast_to(skew[0, :1], (3, 28)))
    assert model.config.neumann_terms == 3  # num_cayley_neumann_terms = 3
    # PEFT projects the weights onto ||S||_F <= eps / sqrt(rows) before each forward (what it saved is
    # projected already); rows 3x too long must load to the same rotations, hence PEFT's outputs.
    bigger = copy_fixture("vit_oft_share_coft", tmp_path)
    edit_tensors(bigger, lambda t: {k: 3 * v if "oft_R" in k else v for k, v in t.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, params = load_peft_adapter(bigger, *base("vit"))
        ref = reference("vit_oft_share_coft")
        assert_close(run(model, params, ref), ref["outputs"])
        edit_config(bigger, coft=False)  # without the projection they are other rotations
        model, params = load_peft_adapter(bigger, *base("vit"))
    assert np.abs(np.asarray(run(model, params, ref)) - ref["outputs"]).max() > 1e-2
    # a config whose r the tensors contradict: the warning says how shared blocks are counted
    with pytest.warns(UserWarning) as record:  # (with the block_share and coft notes above)
        model, params = load_oft("vit_oft_share_coft", tmp_path / "r3", oft_block_size=0, r=3)
    assert any(re.search(r"r = 3, but its oft_R tensors hold block counts \[4\] \(block_share: a layer stores one block"
                         r" of size b and uses it d_in / b times\).*using the tensors: block_size = 8", str(w.message))
               for w in record), [str(w.message) for w in record]
    assert model.config.block_size == 8
    assert_close(run(model, params, ref), ref["outputs"])


def test_oft_block_size_adjusted_by_peft_warns_and_uses_the_tensors():
    with pytest.warns(UserWarning, match=r"oft_block_size = 5, but its oft_R tensors hold blocks of size \[4\].*block_size = 4"):
        model, _ = load_oft("vit_oft_adjusted")
    assert model.config.block_size == 4


def test_oft_layers_adjusted_differently_get_block_size_overrides(tmp_path, capsys):
    """r = 3 on an mT5: PEFT keeps 3 blocks where 3 divides the width (q, wi_0: blocks of 8; o: 6)
    and adjusts wo (width 40) to 2 blocks of 20, so no single block size or count describes the
    layers.  The config keeps r (block_num = 3) and overrides wo's block size; the outputs equal
    PEFT's (test_outputs_match_peft), also with scan_layers, and the adapter goes through orbax and
    back to PEFT unchanged (r = 3 again, which PEFT adjusts the same way)."""
    ref = reference("mt5_oft_mixed")
    with pytest.warns(UserWarning, match=r"r = 3, but its oft_R tensors hold block counts \[2, 3\].*block_size_overrides, 4 layer"):
        model, params = load_oft("mt5_oft_mixed")
    cfg = model.config
    assert (cfg.block_num, cfg.block_size) == (3, None)
    assert sorted(b for _, b in cfg.block_size_overrides) == [20] * 4
    assert all(p.endswith("mlp/wo") for p, _ in cfg.block_size_overrides)
    shapes = {"/".join(p[:-2]): v.shape for p, v in hf.flatten_params(boft.split(params, cfg)[1]).items() if p[-1] == "skew"}
    assert {s[1:] for p, s in shapes.items() if p.endswith("wo")} == {(2, 190)}  # 2 blocks of 20
    assert {s[1:] for p, s in shapes.items() if p.endswith("/o")} == {(3, 15)}  # 3 blocks of 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scanned, scanned_params = load_peft_adapter(PEFT / "mt5_oft_mixed", *base("mt5", scan_layers=True))
    assert_close(run(scanned, scanned_params, ref), ref["outputs"])

    ckpt, back, as_boft = tmp_path / "orbax", tmp_path / "peft", tmp_path / "as_boft"
    src = copy_fixture("mt5_oft_mixed", tmp_path)  # a revision and a task type that "auto" would not give
    edit_config(src, revision="v1.2", task_type="FEATURE_EXTRACTION")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["convert", "--from", "peft", "--adapter", str(src), "--base", str(FIXTURES / "mt5"),
                     "--out", str(ckpt)]) == 0
    from boft_jax.checkpoint import load_adapter

    assert load_adapter(ckpt)[1] == cfg
    # no --peft-type / --task-type: the round trip gives back the PEFT adapter it started from
    assert main(["convert", "--from", "boft", "--adapter", str(ckpt), "--out", str(back)]) == 0
    written, original = load_file(back / peft_io.ADAPTER_WEIGHTS_NAME), load_file(PEFT / "mt5_oft_mixed" / peft_io.ADAPTER_WEIGHTS_NAME)
    assert sorted(written) == sorted(original)
    for k in original:
        np.testing.assert_array_equal(written[k], original[k], err_msg=k)
    back_cfg = json.loads((back / peft_io.ADAPTER_CONFIG_NAME).read_text())
    assert (back_cfg["peft_type"], back_cfg["r"], back_cfg["task_type"], back_cfg["revision"]) == (
        "OFT", 3, "FEATURE_EXTRACTION", "v1.2")
    # an explicit choice wins over the record (BOFT has no Neumann map: refused, said why)
    capsys.readouterr()
    assert main(["convert", "--from", "boft", "--adapter", str(ckpt), "--out", str(as_boft), "--peft-type", "BOFT"]) == 2
    assert "PEFT's BOFT only has the exact Cayley map" in capsys.readouterr().err
    # PEFT's BOFT has no adjustment: one boft_block_size or boft_block_num must fit every layer
    with pytest.raises(ValueError, match=r"PEFT's BOFT config holds one boft_block_size or boft_block_num for all layers; no single value"):
        save_peft_adapter(tmp_path / "boft", boft.wrap(model.model, dataclasses.replace(cfg, cayley="exact", neumann_terms=5)), params)
    capsys.readouterr()


def test_oft_without_use_cayley_neumann_follows_peft_default(tmp_path):
    """Configs from before PEFT had the option: PEFT >= 0.16 fills in its default (Neumann, 5 terms)."""
    path = copy_fixture("vit_oft_neumann", tmp_path)
    cfg = json.loads((path / peft_io.ADAPTER_CONFIG_NAME).read_text())
    for key in ("use_cayley_neumann", "num_cayley_neumann_terms", "peft_version"):
        del cfg[key]
    (path / peft_io.ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model, params = load_peft_adapter(path, *base("vit"))
    assert [str(w.message) for w in record if "0.18" in str(w.message)] == []  # no second, version warning
    assert any("has no use_cayley_neumann" in str(w.message) and "set \"use_cayley_neumann\": false" in str(w.message)
               for w in record)
    assert (model.config.cayley, model.config.neumann_terms) == ("neumann", 4)
    ref = reference("vit_oft_neumann")
    assert_close(run(model, params, ref), ref["outputs"])


def test_adapted_tied_t5_head_and_peft_copy_of_its_base_weight(tmp_path):
    """OFT on original T5's tied lm_head: PEFT rotates the tied head's input and saves the head's base
    weight (the shared embedding) as lm_head.base_layer.weight; it must equal the model's."""
    tensors = load_file(PEFT / "t5_oft_lm_head" / peft_io.ADAPTER_WEIGHTS_NAME)
    assert "base_model.model.lm_head.base_layer.weight" in tensors
    module, _ = base("t5_relu")
    assert module.config.tie_word_embeddings
    model, params = load("t5_oft_lm_head")
    assert not model.model.config.tie_word_embeddings and model.model.config.scale_decoder_outputs
    assert "^lm_head" in model.config.targets
    ref = reference("t5_oft_lm_head")
    assert_close(run(model, params, ref), ref["outputs"])
    bad = copy_fixture("t5_oft_lm_head", tmp_path)
    edit_tensors(bad, lambda t: {k: (v + 0.5 if k.endswith("lm_head.base_layer.weight") else v) for k, v in t.items()})
    with pytest.raises(ValueError, match=r"lm_head\.weight -> 'lm_head/kernel': PEFT's copy of this adapted layer's base"
                                         r" weight differs from the model's \(max \|diff\| 0\.5\)"):
        load_peft_adapter(bad, *base("t5_relu"))


@pytest.mark.parametrize(
    "name, field, value, want",
    [
        ("vit_oft_exact_r", "coft", "false", "true or false"),  # a string is not a JSON boolean (bool("false") is True)
        ("vit_oft_exact_r", "block_share", 1, "true or false"),
        ("vit_oft_neumann", "num_cayley_neumann_terms", 4.5, "an integer"),
        ("vit_oft_exact_r", "module_dropout", "0.1", "a number"),
        ("vit_oft_exact_r", "r", "4", "an integer"),
        ("vit_m2_head", "boft_block_size", [4], "an integer"),
        ("vit_m2_head", "boft_n_butterfly_factor", "2", "an integer"),
        ("vit_m2_head", "boft_dropout", True, "a number"),
        ("vit_m2_head", "fan_in_fan_out", "false", "true or false"),
        ("vit_m2_head", "target_modules", 5, r"a string \(a regex\) or a list of module names"),
        ("vit_m2_head", "exclude_modules", ["q_proj", 3], r"a string \(a regex\) or a list of module names"),
        ("vit_m2_head", "layers_to_transform", "1", "an integer or a list of integers"),
        ("vit_m2_head", "modules_to_save", 7, "a list of module names"),
    ],
)
def test_malformed_config_field_is_named(tmp_path, name, field, value, want):
    path = copy_fixture(name, tmp_path)
    edit_config(path, **{field: value})
    with pytest.raises(ValueError, match=rf"adapter_config\.json field '{field}' is {re.escape(repr(value))}; expected {want}"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_peft_adapter(path, *base(str(reference(name)["base"])))


def test_null_config_fields_read_as_peft_does(tmp_path):
    """JSON null: falsy for PEFT's flags (``use_cayley_neumann: null`` is the exact map), absent numbers."""
    exact = load_oft("vit_oft_exact_r")
    model, params = load_oft("vit_oft_exact_r", tmp_path, use_cayley_neumann=None, coft=None, module_dropout=None)
    assert model.config == exact[0].config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(exact[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_oft_errors(tmp_path):
    with pytest.raises(ValueError, match=r"num_cayley_neumann_terms = 1.*I \(the adapter does nothing\).*>= 2"):
        load_oft("vit_oft_neumann", tmp_path / "b", num_cayley_neumann_terms=1)
    old = copy_fixture("vit_oft_exact_r", tmp_path / "c")
    cfg = json.loads((old / peft_io.ADAPTER_CONFIG_NAME).read_text())
    del cfg["oft_block_size"]
    (old / peft_io.ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"PEFT < 0\.14"):
        load_peft_adapter(old, *base("vit"))
    with pytest.warns(UserWarning, match=r"PEFT 0\.17\.1.*changed that map in 0\.18"):
        load_oft("vit_oft_neumann", tmp_path / "d", peft_version="0.17.1")
    # r = 4 rows on a 32-wide layer is b = 8; rows of b = 4 (6 numbers) cannot be r = 4 blocks there
    bad = copy_fixture("vit_oft_exact_r", tmp_path / "e")
    edit_tensors(bad, lambda t: {k: (v[:, :6] if "oft_R" in k else v) for k, v in t.items()})
    with pytest.raises(ValueError, match=r"q_proj -> 'encoder/layer_0/attention/query': oft_R.weight has shape \(4, 6\), expected r = d_in / b = 32 / 4 = 8 rows"):
        load_peft_adapter(bad, *base("vit"))
    mixed = copy_fixture("vit_oft_exact_r", tmp_path / "f")  # a BOFT tensor in an OFT adapter
    edit_tensors(mixed, lambda t: {**t, "base_model.model.vit.layers.0.mlp.fc1.boft_s": np.ones((64, 1), np.float32)})
    with pytest.raises(ValueError, match=r"fc1\.boft_s.*not a OFT parameter.*'boft_\*' tensors belong to the other PEFT type"):
        load_peft_adapter(mixed, *base("vit"))
    # PEFT's OFT on T5's shared embedding (target_modules=[..., "shared"]) saves oft_embedding_R:
    # the error names the tensor kind, not a module the model lacks (the model has "shared")
    emb = copy_fixture("t5_oft_gated", tmp_path / "g")

    def add_embedding(t):
        r = next(v for k, v in t.items() if k.endswith("oft_R.weight"))
        return {**t, "base_model.model.shared.oft_embedding_R.weight": r}

    edit_tensors(emb, add_embedding)
    with pytest.raises(ValueError, match=r"1 tensor\(s\) that boft_jax cannot load:\s+base_model\.model\.shared\.oft_embedding_R"
                       r"\.weight \(shape .*; PEFT's OFT on an embedding layer \(nn\.Embedding\); boft_jax adapts Dense layers only\)"):
        load_peft_adapter(emb, *base(str(reference("t5_oft_gated")["base"])))


def test_saving_as_oft_refuses_what_oft_cannot_represent(tmp_path):
    import dataclasses

    model, params, _ = ours("ours_vit")  # m = 2, scales != 1
    with pytest.raises(ValueError, match=r"one block-diagonal factor.*n_factors = 2.*peft_type='BOFT'"):
        save_peft_adapter(tmp_path / "a", model, params, peft_type="OFT")
    model, params, _ = ours("ours_vit_oft")
    scaled = jax.tree.map(lambda x: x, params)
    kernel = scaled["encoder"]["layer_1"]["mlp"]["fc1"]["kernel"]
    scaled["encoder"]["layer_1"]["mlp"]["fc1"]["kernel"] = boft.BOFTKernel(kernel.kernel, kernel.skew, kernel.scale.at[3].set(1.25))
    with pytest.raises(ValueError, match=r"no output scale(?s:.*)encoder/layer_1/mlp/fc1: max \|s - 1\| = 0\.25"):
        save_peft_adapter(tmp_path / "a", model, scaled, peft_type="OFT")
    short = boft.wrap(model.model, dataclasses.replace(model.config, neumann_terms=2))
    with pytest.raises(ValueError, match=r"neumann_terms = 2, the rotation \(I - S\)\^2.*no setting for"):
        save_peft_adapter(tmp_path / "a", short, params, peft_type="OFT")
    with pytest.raises(ValueError, match=r"peft_type must be one of"):
        save_peft_adapter(tmp_path / "a", model, params, peft_type="LORA")
    with pytest.raises(ValueError, match=r"BOFT only has the exact Cayley map.*peft_type='OFT'"):
        save_peft_adapter(tmp_path / "a", model, params)  # Neumann as BOFT
    assert not (tmp_path / "a").exists()


def test_oft_training_recipe_keeps_scales_at_one_and_saves_as_oft(tmp_path):
    """The README's recipe for PEFT-style OFT (no output scale): optax masks the scales' updates."""
    import optax

    module, frozen = base("vit")
    config = boft.BOFTConfig(block_size=8, targets=["attention/query", "attention/value", "mlp/fc1"], cayley="neumann",
                             neumann_terms=4)
    model = boft.wrap(module, config)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    target = jax.random.normal(jax.random.key(1), module.apply({"params": frozen}, x).shape)
    adapter = boft.init_adapter(model, frozen, x)
    # --- the recipe (README "Finetuning any linen model") ---
    frozen_scales = jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "scale", adapter)
    opt = optax.chain(optax.adamw(1e-2), optax.masked(optax.set_to_zero(), frozen_scales))
    # ---
    state = opt.init(adapter)

    @jax.jit
    def step(adapter, state):
        loss, g = jax.value_and_grad(lambda a: jnp.mean((model.apply({"params": boft.combine(frozen, a)}, x) - target) ** 2))(adapter)
        updates, state = opt.update(g, state, adapter)
        return optax.apply_updates(adapter, updates), state, loss

    losses = []
    for _ in range(5):
        adapter, state, loss = step(adapter, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    kernels = [v for v in jax.tree.leaves(adapter, is_leaf=lambda v: isinstance(v, dict) and "scale" in v) if isinstance(v, dict)]
    assert len(kernels) == 6 and all(np.all(np.asarray(k["scale"]) == 1) and np.abs(k["skew"]).max() > 1e-3 for k in kernels)
    params = boft.combine(frozen, adapter)
    save_peft_adapter(tmp_path / "oft", model, params, peft_type="OFT")
    again, params2 = load_peft_adapter(tmp_path / "oft", *base("vit"))
    assert_close(again.apply({"params": params2}, x), model.apply({"params": params}, x), tol=1e-6)


# ---------------------------------------------------------------------------------------------
# Our adapters in PEFT's format
# ---------------------------------------------------------------------------------------------
def ours(name):
    """(wrapped model, params) of the boft_jax adapter that the fixture script saved for PEFT."""
    ref = reference(name)
    module, frozen = base(str(ref["base"]), bool(ref["scan_layers"]))
    tree = {}
    for key, value in np.load(PEFT / f"{name}_adapter.npz", allow_pickle=False).items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    params = boft.combine(frozen, tree)
    cfg = json.loads((PEFT / name / peft_io.ADAPTER_CONFIG_NAME).read_text())
    config = {  # as in make_peft_fixtures.py
        "ours_vit": boft.BOFTConfig(block_size=4, n_factors=2, targets=vit.TARGET_PRESETS["all_linear"],
                                    bias="boft_only", modules_to_save="classifier"),
        "ours_t5": boft.BOFTConfig(block_num=2, n_factors=2, targets=t5.TARGET_PRESETS["attention"]),
        "ours_vit_oft": boft.BOFTConfig(block_size=8, n_factors=1, targets=vit.TARGET_PRESETS["all_linear"],
                                        bias="boft_only", cayley="neumann", neumann_terms=4),
        "ours_t5_oft": boft.BOFTConfig(block_num=4, n_factors=1, targets=t5.TARGET_PRESETS["attention"]),
        "ours_vit_bare": boft.BOFTConfig(block_size=4, n_factors=2, targets=vit.TARGET_PRESETS["all_linear"],
                                         bias="boft_only"),
    }[name]
    return boft.wrap(module, config), params, cfg


@pytest.mark.parametrize("name", OURS)
def test_saved_adapter_is_what_peft_ran(name, tmp_path):
    """save_peft_adapter writes exactly the committed files, on which PEFT computed our outputs."""
    model, params, committed_cfg = ours(name)
    ref = reference(name)
    out = run(model, params, ref)
    assert_close(out, ref["outputs"])
    assert_close(out, ref["outputs_f64"])

    save_peft_adapter(tmp_path / "a", model, params, base_model_name_or_path=committed_cfg["base_model_name_or_path"],
                      peft_type=committed_cfg["peft_type"])
    assert json.loads((tmp_path / "a" / peft_io.ADAPTER_CONFIG_NAME).read_text()) == committed_cfg
    mine, theirs = load_file(tmp_path / "a" / peft_io.ADAPTER_WEIGHTS_NAME), load_file(PEFT / name / peft_io.ADAPTER_WEIGHTS_NAME)
    assert sorted(mine) == sorted(theirs)
    for k in mine:
        np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp dirs left


def test_saved_format_details():
    tensors = load_file(PEFT / "ours_vit" / peft_io.ADAPTER_WEIGHTS_NAME)
    cfg = json.loads((PEFT / "ours_vit" / peft_io.ADAPTER_CONFIG_NAME).read_text())
    R = tensors["base_model.model.vit.layers.0.attention.q_proj.boft_R"]
    assert R.shape == (2, 8, 4, 4) and tensors["base_model.model.vit.layers.0.attention.q_proj.boft_s"].shape == (32, 1)
    np.testing.assert_array_equal(R, -np.swapaxes(R, -1, -2))  # the skew matrix itself: 0.5 (S - S^T) = S
    assert "base_model.model.vit.layers.0.mlp.fc2.base_layer.bias" in tensors  # bias="boft_only"
    assert "base_model.model.classifier.weight" in tensors
    assert cfg["peft_type"] == "BOFT" and cfg["bias"] == "boft_only" and cfg["modules_to_save"] == ["classifier"]
    assert (cfg["boft_block_size"], cfg["boft_block_num"], cfg["boft_n_butterfly_factor"]) == (4, 0, 2)
    assert len(cfg["target_modules"]) == 12 and "vit.layers.1.mlp.fc2" in cfg["target_modules"]
    t5_cfg = json.loads((PEFT / "ours_t5" / peft_io.ADAPTER_CONFIG_NAME).read_text())
    assert (t5_cfg["boft_block_size"], t5_cfg["boft_block_num"], t5_cfg["task_type"]) == (0, 2, "SEQ_2_SEQ_LM")


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("key_style", ["transformers5", "transformers4"])
def test_round_trip_boft_peft_boft_is_identical(name, key_style, tmp_path):
    model, params, committed_cfg = ours(name)
    peft_type = committed_cfg["peft_type"]
    save_peft_adapter(tmp_path / "a", model, params, key_style=key_style, peft_type=peft_type)
    keys = load_file(tmp_path / "a" / peft_io.ADAPTER_WEIGHTS_NAME)
    if name.startswith("ours_vit"):
        style = "vit.layers.0.attention.q_proj" if key_style == "transformers5" else "vit.encoder.layer.0.attention.attention.query"
        if name == "ours_vit_bare":  # a headless ViT is saved for a bare ViTModel: no "vit." prefix
            style = style.removeprefix("vit.")
            assert not any(k.startswith("base_model.model.vit.") for k in keys)
        assert f"base_model.model.{style}.{'boft_R' if peft_type == 'BOFT' else 'oft_R.weight'}" in keys
    again, params2 = load_peft_adapter(tmp_path / "a", model.model, base(str(reference(name)["base"]), model.model.scan_layers)[1])
    a, b = flat_adapter(params, model.config), flat_adapter(params2, again.config)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg="/".join(k))
    for field in ("block_size", "block_num", "n_factors", "bias", "dropout", "cayley", "neumann_terms"):
        if field != "neumann_terms" or model.config.cayley == "neumann":
            assert getattr(again.config, field) == getattr(model.config, field), field
    # exact regexes select the same layers as the original patterns
    assert boft.layer_paths(params2) == boft.layer_paths(params)


def test_one_term_neumann_is_peft_two_terms_both_ways(tmp_path):
    """Our one-term map I - S is PEFT's two-term series I + 2 S_p with S_p = -S / 2: saved as
    num_cayley_neumann_terms = 2, read back exactly, and PEFT's formula (written out in float64 from the
    saved weights) gives our rotation."""
    import dataclasses

    model, params, _ = ours("ours_vit_oft")
    one = boft.wrap(model.model, dataclasses.replace(model.config, neumann_terms=1))
    save_peft_adapter(tmp_path / "a", one, params, peft_type="OFT")
    cfg = json.loads((tmp_path / "a" / peft_io.ADAPTER_CONFIG_NAME).read_text())
    assert (cfg["use_cayley_neumann"], cfg["num_cayley_neumann_terms"]) == (True, 2)
    written = load_file(tmp_path / "a" / peft_io.ADAPTER_WEIGHTS_NAME)
    kernel = params["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
    S = np_skew_from_packed(written["base_model.model.vit.layers.0.mlp.fc1.oft_R.weight"], one.config.block_size)
    with jax.enable_x64(True):
        ours_blocks = boft.cayley(jnp.asarray(np.asarray(kernel.skew[0], np.float64)), one.config.block_size,
                                  "neumann", neumann_terms=1)
    np.testing.assert_allclose(np.asarray(ours_blocks), np.eye(S.shape[-1]) + 2 * S, atol=1e-12)  # PEFT: R = I + 2 S_p
    assert float(np.abs(S).max()) > 1e-3
    again, params2 = load_peft_adapter(tmp_path / "a", model.model, base(str(reference("ours_vit_oft")["base"]))[1])
    assert (again.config.cayley, again.config.neumann_terms) == ("neumann", 1)
    before, after = flat_adapter(params, one.config), flat_adapter(params2, again.config)
    assert sorted(before) == sorted(after)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg="/".join(k))


@pytest.mark.parametrize("name", ["vit_m2_head", "vit_m3_all", "t5_gated_m3_head", "t5_relu_tied_head",
                                  "vit_oft_neumann", "vit_oft_exact_r", "t5_oft_gated", "mt5_oft_mixed"])
def test_round_trip_peft_boft_peft(name, tmp_path):
    model, params = load(name)
    peft_cfg = json.loads((PEFT / name / peft_io.ADAPTER_CONFIG_NAME).read_text())
    save_peft_adapter(tmp_path / "a", model, params, peft_type=peft_cfg["peft_type"])
    original = load_file(PEFT / name / peft_io.ADAPTER_WEIGHTS_NAME)
    written = load_file(tmp_path / "a" / peft_io.ADAPTER_WEIGHTS_NAME)
    original = {k: v for k, v in original.items() if ".original_module." not in k and ".modules_to_save." not in k}
    assert sorted(original) == sorted(written)
    for k, v in original.items():
        # PEFT only ever uses the skew part of boft_R
        expected = 0.5 * (v - np.swapaxes(v, -1, -2)) if k.endswith("boft_R") else v
        np.testing.assert_array_equal(written[k], expected, err_msg=k)
    cfg = json.loads((tmp_path / "a" / peft_io.ADAPTER_CONFIG_NAME).read_text())
    fields = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout") if peft_cfg["peft_type"] == "BOFT" else (
        "oft_block_size", "r", "module_dropout", "use_cayley_neumann", "num_cayley_neumann_terms", "coft", "block_share")
    for field in (*fields, "peft_type", "bias", "modules_to_save"):
        assert cfg[field] == peft_cfg[field], field


def test_save_into_existing_directory_replaces_files(tmp_path):
    model, params, _ = ours("ours_vit")
    out = tmp_path / "a"
    out.mkdir()
    (out / "README.md").write_text("keep me")
    (out / "adapter_model.bin").write_bytes(b"stale pickle")
    (out / peft_io.ADAPTER_CONFIG_NAME).write_text("{}")
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "vocab.txt").write_text("a b c")
    save_peft_adapter(out, model, params)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", peft_io.ADAPTER_CONFIG_NAME, peft_io.ADAPTER_WEIGHTS_NAME,
                                                     "tokenizer"]
    assert (out / "README.md").read_text() == "keep me" and (out / "tokenizer" / "vocab.txt").read_text() == "a b c"
    assert json.loads((out / peft_io.ADAPTER_CONFIG_NAME).read_text())["peft_type"] == "BOFT"
    # a symlink to the adapter directory: written through, the link kept
    (tmp_path / "link").symlink_to(out)
    save_peft_adapter(tmp_path / "link", model, jax.tree.map(lambda a: a + 0.01, params))
    assert (tmp_path / "link").is_symlink() and (out / "README.md").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "link"]


@pytest.mark.parametrize("edit", [{"target_modules": ["q_proj"]}, {"target_modules": r".*\.q_proj"},
                                  {"layers_to_transform": [5], "layers_pattern": "layers"},
                                  {"exclude_modules": ["v_proj"]}])
def test_tensors_of_modules_the_config_does_not_select_are_named(edit, tmp_path):
    """A hand-edited adapter_config.json that no longer selects some modules whose tensors the file
    holds: PEFT would skip those layers; boft_jax loads them and warns, naming them (nothing silent)."""
    src = PEFT / "vit_m1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the consistent original: no such warning
        load_peft_adapter(src, *vit.from_pretrained(FIXTURES / "vit"))
    shutil.copytree(src, tmp_path / "a")
    cfg = json.loads((src / peft_io.ADAPTER_CONFIG_NAME).read_text())
    (tmp_path / "a" / peft_io.ADAPTER_CONFIG_NAME).write_text(json.dumps({**cfg, **edit}))
    with pytest.warns(UserWarning, match=r"does not select \d+ module\(s\) whose BOFT tensors the file holds.*PEFT leaves"):
        load_peft_adapter(tmp_path / "a", *vit.from_pretrained(FIXTURES / "vit"))


@pytest.mark.parametrize("init_weights, said", [(True, r"at the identity \(init_weights true\), so the outputs agree"),
                                                (False, r"at random \(init_weights false\), so its outputs differ")])
def test_modules_the_config_selects_without_tensors_are_named(init_weights, said, tmp_path):
    """The reverse of the test above: a file missing some selected layers' tensors (PEFT warns of
    missing adapter keys); boft_jax leaves those layers unadapted and says so."""
    bad = copy_fixture("vit_m1", tmp_path)
    edit_config(bad, init_weights=init_weights)
    edit_tensors(bad, lambda t: {k: v for k, v in t.items() if "layers.1.attention.v_proj" not in k})
    with pytest.warns(UserWarning, match=r"adapter_config\.json selects 1 module\(s\) for which the file holds no BOFT"
                                         r" tensors, e.g. \['vit\.layers\.1\.attention\.v_proj'\]: boft_jax leaves them"
                                         r" unadapted\. .*" + said):
        model, params = load_peft_adapter(bad, *vit.from_pretrained(FIXTURES / "vit"))
    assert boft.layer_paths(params) == ["encoder/layer_0/attention/query", "encoder/layer_0/attention/value",
                                        "encoder/layer_1/attention/query"]


def test_a_saved_head_for_another_number_of_classes_names_both_layouts_and_num_labels():
    n = base("vit")[0].config.num_labels
    with pytest.raises(ValueError, match=rf"classifier\.weight -> 'classifier/kernel': shape \({n}, (\d+)\) \(as the"
                                         rf" model lays it out, \(\1, {n}\)\) does not fit the model's \(\1, {n + 2}\)"
                                         r" \(load the base with a matching num_labels\)"):
        load_peft_adapter(PEFT / "vit_m2_head", *base("vit", num_labels=n + 2))


def test_config_fields_peft_does_not_know_are_warned_about_and_size_with_num_refused(tmp_path):
    """PEFT ignores unknown fields with a warning (one from a newer PEFT might change the adapter), and
    refuses a config with both a block size and a block count."""
    odd = copy_fixture("vit_m1", tmp_path / "a")
    edit_config(odd, use_dora=True, foo_bar=3)
    with pytest.warns(UserWarning, match=r"adapter_config\.json has field\(s\) \['foo_bar', 'use_dora'\] that PEFT"
                                         r" 0\.21's BOFTConfig does not have; boft_jax ignores them"):
        load_peft_adapter(odd, *vit.from_pretrained(FIXTURES / "vit"))
    for name, size, num in (("vit_m1", "boft_block_size", "boft_block_num"), ("vit_oft_exact_r", "oft_block_size", "r")):
        both = copy_fixture(name, tmp_path / "b")
        cfg = json.loads((both / peft_io.ADAPTER_CONFIG_NAME).read_text())
        edit_config(both, **{size: cfg[size] or 4, num: cfg[num] or 4})
        with pytest.raises(ValueError, match=rf"sets both {size} = 4 and {num} = 4; PEFT refuses a config with both"):
            load_peft_adapter(both, *vit.from_pretrained(FIXTURES / "vit"))


def test_an_interrupted_save_over_an_adapter_leaves_the_old_one_whole(tmp_path, monkeypatch):
    """Weights and config change together: a save that dies while writing, or between the two renames
    of its directory swap, leaves the previous adapter loadable (never new weights with an old
    config); in the second case the error of a read names where the old one is."""
    model, params, _ = ours("ours_vit")
    out = tmp_path / "a"
    save_peft_adapter(out, model, params)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    moved = jax.tree.map(lambda a: a + 0.05, params)
    import safetensors.numpy as stn

    real_save_file = stn.save_file

    def dying_save_file(tensors, path, **kw):
        real_save_file(tensors, path, **kw)
        raise KeyboardInterrupt("killed after the weights")

    monkeypatch.setattr(stn, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        save_peft_adapter(out, model, moved)
    monkeypatch.setattr(stn, "save_file", real_save_file)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left behind
    real_replace = os.replace

    def dying_replace(src, dst):
        if ".tmp-" in str(src):
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        save_peft_adapter(out, model, moved)
    monkeypatch.setattr(os, "replace", real_replace)
    old = [p for p in tmp_path.iterdir() if p.name.startswith(".a.old-")]
    assert not out.exists() and len(old) == 1 and {p.name: p.read_bytes() for p in old[0].iterdir()} == before
    with pytest.raises(FileNotFoundError, match=f"the previous adapter is in {re.escape(str(old[0]))}; rename it back"):
        peft_io.read_peft_adapter(out)


# ---------------------------------------------------------------------------------------------
# Merged export, loaded by plain transformers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["merged_vit", "merged_t5", "merged_vit_bare"])
def test_export_merged_matches_transformers(name, tmp_path):
    ref = reference(name)
    export_merged(PEFT / str(ref["adapter"]), tmp_path / "m", base=FIXTURES / str(ref["base"]))
    # The export equals the committed one, on which transformers computed ref["outputs"] ...
    mine, theirs = load_file(tmp_path / "m" / "model.safetensors"), load_file(PEFT / name / "model.safetensors")
    assert sorted(mine) == sorted(theirs)
    for k in mine:
        np.testing.assert_allclose(mine[k], theirs[k], atol=1e-6, rtol=0, err_msg=k)
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == json.loads((PEFT / name / "config.json").read_text())
    # ... which equal our adapted model's outputs, and those of the export loaded back.
    model, params = load(str(ref["adapter"]))
    out = run(model, params, ref)
    assert_close(out, ref["outputs"])
    assert_close(out, ref["outputs_f64"])
    merged_module, merged_params = hf.from_pretrained(tmp_path / "m")
    assert_close(run(merged_module, merged_params, ref), ref["outputs"])


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_convert_both_ways_and_export(tmp_path, capsys):
    ref = reference("vit_m2_head")
    ckpt, back, merged = tmp_path / "orbax", tmp_path / "peft", tmp_path / "merged"
    assert main(["convert", "--from", "peft", "--adapter", str(PEFT / "vit_m2_head"), "--base", str(FIXTURES / "vit"),
                 "--out", str(ckpt)]) == 0
    # base defaults to the one recorded in the checkpoint's metadata
    assert main(["convert", "--from", "boft", "--adapter", str(ckpt), "--out", str(back)]) == 0
    model, params = load_peft_adapter(back, *base("vit"))
    assert_close(run(model, params, ref), ref["outputs"])
    assert main(["export-merged", "--adapter", str(ckpt), "--out", str(merged)]) == 0
    merged_module, merged_params = hf.from_pretrained(merged)
    assert_close(run(merged_module, merged_params, ref), reference("merged_vit")["outputs"])
    assert "wrote" in capsys.readouterr().out


def test_cli_converts_an_adapter_of_a_bare_vit_model(tmp_path, capsys):
    """A ViTModel base (no classifier) and an adapter without one: the CLI loads the base headless
    (it asked for a num_labels it has no option for), and the adapter goes back to PEFT with the
    ViTModel's module names, as PEFT made it."""
    ref = reference("vit_bare_m2")
    ckpt, back = tmp_path / "orbax", tmp_path / "peft"
    assert main(["convert", "--from", "peft", "--adapter", str(PEFT / "vit_bare_m2"), "--base", str(FIXTURES / "vit_bare"),
                 "--out", str(ckpt)]) == 0
    assert main(["convert", "--from", "boft", "--adapter", str(ckpt), "--out", str(back)]) == 0
    original = json.loads((PEFT / "vit_bare_m2" / peft_io.ADAPTER_CONFIG_NAME).read_text())
    written = json.loads((back / peft_io.ADAPTER_CONFIG_NAME).read_text())
    assert written["target_modules"] == sorted(f"layers.{i}.{m}" for i in range(2) for m in ("attention.q_proj", "attention.v_proj", "mlp.fc2"))
    assert all(any(t.endswith(o) for o in original["target_modules"]) for t in written["target_modules"])
    assert sorted(load_file(back / peft_io.ADAPTER_WEIGHTS_NAME)) == sorted(load_file(PEFT / "vit_bare_m2" / peft_io.ADAPTER_WEIGHTS_NAME))
    model, params = load_peft_adapter(back, *base("vit_bare"))
    assert_close(run(model, params, ref), ref["outputs"])


def test_cli_oft_convert_both_ways_and_export(tmp_path, capsys):
    """A PEFT OFT adapter (Neumann map, oft_only biases) through orbax and back, and merged."""
    name = "vit_oft_neumann"
    ref = reference(name)
    ckpt, back, merged = tmp_path / "orbax", tmp_path / "peft", tmp_path / "merged"
    assert main(["convert", "--from", "peft", "--adapter", str(PEFT / name), "--base", str(FIXTURES / "vit"),
                 "--out", str(ckpt)]) == 0
    assert main(["convert", "--from", "boft", "--adapter", str(ckpt), "--out", str(back), "--peft-type", "OFT"]) == 0
    original, written = load_file(PEFT / name / peft_io.ADAPTER_WEIGHTS_NAME), load_file(back / peft_io.ADAPTER_WEIGHTS_NAME)
    assert sorted(original) == sorted(written)
    for k in original:
        np.testing.assert_array_equal(written[k], original[k], err_msg=k)
    cfg = json.loads((back / peft_io.ADAPTER_CONFIG_NAME).read_text())
    assert (cfg["peft_type"], cfg["use_cayley_neumann"], cfg["num_cayley_neumann_terms"], cfg["bias"]) == ("OFT", True, 5, "oft_only")
    assert main(["export-merged", "--adapter", str(ckpt), "--out", str(merged)]) == 0
    merged_module, merged_params = hf.from_pretrained(merged)
    assert_close(run(merged_module, merged_params, ref), ref["outputs"])
    capsys.readouterr()


@pytest.mark.parametrize("name,peft_type", [("t5_relu_tied_head", "BOFT"), ("t5_oft_lm_head", "OFT")])
def test_cli_tied_t5_head_through_orbax_and_back(name, peft_type, tmp_path, capsys):
    """A PEFT adapter that saves (BOFT) or adapts (OFT) a tied T5's lm_head: PEFT runs an untied
    copy of the head; the orbax checkpoint made from it is converted back and exported on the same
    untied head (it used to fail: the base rebuilt from the checkpoint had no lm_head)."""
    ref = reference(name)
    base_dir = FIXTURES / str(ref["base"])
    ckpt, back, merged = tmp_path / "orbax", tmp_path / "peft", tmp_path / "merged"
    assert main(["convert", "--from", "peft", "--adapter", str(PEFT / name), "--base", str(base_dir), "--out", str(ckpt)]) == 0
    assert main(["convert", "--from", "boft", "--adapter", str(ckpt), "--out", str(back), "--peft-type", peft_type]) == 0
    original, written = load_file(PEFT / name / peft_io.ADAPTER_WEIGHTS_NAME), load_file(back / peft_io.ADAPTER_WEIGHTS_NAME)
    for k in written:
        assert k in original, k
        expected = 0.5 * (original[k] - np.swapaxes(original[k], -1, -2)) if k.endswith("boft_R") else original[k]
        np.testing.assert_array_equal(written[k], expected, err_msg=k)
    assert any("lm_head" in k for k in written)
    model, params = load_peft_adapter(back, *base(str(ref["base"])))
    assert_close(run(model, params, ref), ref["outputs"])
    assert main(["export-merged", "--adapter", str(ckpt), "--out", str(merged)]) == 0
    merged_module, merged_params = hf.from_pretrained(merged)
    assert_close(run(merged_module, merged_params, ref), ref["outputs"])
    assert np.abs(ref["outputs"] - ref["base_outputs"]).max() > 0.05
    capsys.readouterr()


def test_cli_errors_are_reported(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export-merged", "--adapter", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    # the other format than --from says: named, with the option that reads it
    assert main(["convert", "--from", "boft", "--adapter", str(PEFT / "vit_m1"), "--out", str(tmp_path / "z")]) == 2
    assert "is a PEFT adapter directory, not a boft_jax (orbax) adapter checkpoint: use --from peft" in capsys.readouterr().err
    assert main(["convert", "--from", "peft", "--adapter", str(PEFT / "vit_m1"), "--out", str(tmp_path / "orbax")]) == 0
    capsys.readouterr()
    assert main(["convert", "--from", "peft", "--adapter", str(tmp_path / "orbax"), "--out", str(tmp_path / "z")]) == 2
    assert "is a boft_jax (orbax) adapter checkpoint, not a PEFT adapter directory: use --from boft" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    # export-merged's option is --format
    assert main(["export-merged", "--format", "peft", "--adapter", str(tmp_path / "orbax"), "--out", str(tmp_path / "z")]) == 2
    assert "not a PEFT adapter directory: use --format boft" in capsys.readouterr().err
    bad = copy_fixture("vit_m1", tmp_path)
    edit_config(bad, base_model_name_or_path="google/vit-base-patch16-224")
    assert main(["convert", "--from", "peft", "--adapter", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "--base" in capsys.readouterr().err


def test_a_folder_of_named_peft_adapters_points_to_its_subfolders(tmp_path, capsys):
    """PEFT's save_pretrained of several adapters none of which is "default" writes only subfolders:
    the error names them (API and CLI), and a subfolder loads."""
    parent = tmp_path / "several"
    parent.mkdir()
    for name in ("a", "b"):
        shutil.copytree(PEFT / "vit_m1", parent / name)
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config\.json.*subfolders \['a', 'b'\] are PEFT adapters"):
        load_peft_adapter(parent, *base("vit"))
    assert main(["export-merged", "--adapter", str(parent), "--base", str(FIXTURES / "vit"), "--out", str(tmp_path / "x")]) == 2
    assert "subfolders ['a', 'b'] are PEFT adapters" in capsys.readouterr().err
    model, params = load_peft_adapter(parent / "b", *base("vit"))
    assert_close(run(model, params, reference("vit_m1")), reference("vit_m1")["outputs"])


def test_cli_never_overwrites_without_asking_and_reports_damaged_inputs(tmp_path, capsys):
    base_dir = tmp_path / "base"
    shutil.copytree(FIXTURES / "vit", base_dir)
    before = {p.name: p.read_bytes() for p in base_dir.iterdir() if p.is_file()}
    ckpt = tmp_path / "orbax"
    args = ["--adapter", str(PEFT / "vit_m2_head"), "--base", str(base_dir)]
    assert main(["convert", "--from", "peft", *args, "--out", str(ckpt)]) == 0
    # the base model itself as the output: refused even with --overwrite
    for extra in ([], ["--overwrite"]):
        assert main(["export-merged", "--adapter", str(ckpt), "--base", str(base_dir), "--out", str(base_dir), *extra]) == 2
        assert "is the --base directory itself" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in base_dir.iterdir() if p.is_file()} == before
    # an existing non-empty output: only with --overwrite
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    for command in (["convert", "--from", "peft", *args], ["export-merged", "--adapter", str(ckpt)]):
        assert main([*command, "--out", str(taken)]) == 2
        assert "exists and is not empty" in capsys.readouterr().err and (taken / "keep.txt").exists()
    # --overwrite replaces only a directory of the kind the command writes, never other files
    assert main(["export-merged", "--adapter", str(ckpt), "--out", str(taken), "--overwrite"]) == 2
    assert "holds other files (['keep.txt']), and this command writes a Hugging Face model directory" in capsys.readouterr().err
    assert (taken / "keep.txt").exists()
    peft_dir = copy_fixture("vit_m1", tmp_path / "peft_out")  # a PEFT adapter: transformers would also load it
    assert main(["export-merged", "--adapter", str(ckpt), "--out", str(peft_dir), "--overwrite"]) == 2
    assert "holds a PEFT adapter" in capsys.readouterr().err and not (peft_dir / "config.json").exists()
    merged = tmp_path / "merged"
    assert main(["export-merged", "--adapter", str(ckpt), "--out", str(merged), "--max-shard-bytes", "30000"]) == 0
    assert main(["export-merged", "--adapter", str(ckpt), "--out", str(merged), "--overwrite"]) == 0
    assert (merged / "model.safetensors").is_file() and not list(merged.glob("*.index.json"))  # replaced whole
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    # an output inside an input (or around it) is refused: replacing it could delete the input
    assert main(["convert", "--from", "boft", "--adapter", str(ckpt), "--out", str(ckpt / "peft")]) == 2
    assert "lies inside the --adapter" in capsys.readouterr().err
    assert main(["convert", "--from", "peft", "--adapter", str(peft_dir), "--base", str(base_dir), "--out", str(tmp_path)]) == 2
    assert "lies around the --adapter" in capsys.readouterr().err
    for task in ("BOGUS", ""):
        assert main(["convert", "--from", "boft", "--adapter", str(ckpt), "--out", str(tmp_path / "t"), "--task-type", task]) == 2
        assert "--task-type" in capsys.readouterr().err and not (tmp_path / "t").exists()
    assert main(["convert", "--from", "boft", "--adapter", str(ckpt), "--out", str(tmp_path / "t"), "--task-type", "seq_cls"]) == 0
    assert json.loads((tmp_path / "t" / peft_io.ADAPTER_CONFIG_NAME).read_text())["task_type"] == "SEQ_CLS"
    assert main(["export-merged", "--adapter", str(ckpt), "--out", ""]) == 2
    assert "--out '': empty" in capsys.readouterr().err
    # bad values and paths: a clear error, exit 2, no traceback
    with pytest.raises(SystemExit) as e:
        main(["export-merged", "--adapter", str(ckpt), "--out", str(tmp_path / "m"), "--max-shard-bytes", "0"])
    assert e.value.code == 2 and "--max-shard-bytes must be a positive" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["convert", "--from", "boft", "--adapter", str(ckpt), "--out", str(tmp_path / "afile" / "x")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["convert", "--from", "boft", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    damaged = copy_fixture("vit_m2_head", tmp_path)
    weights = damaged / peft_io.ADAPTER_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert main(["convert", "--from", "peft", "--adapter", str(damaged), "--base", str(base_dir), "--out", str(tmp_path / "d")]) == 2
    assert "is not a readable safetensors file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        peft_io.read_peft_adapter(damaged)
    listed = copy_fixture("vit_m1", tmp_path / "listed")
    (listed / peft_io.ADAPTER_CONFIG_NAME).write_text("[1, 2]")
    assert main(["convert", "--from", "peft", "--adapter", str(listed), "--base", str(base_dir), "--out", str(tmp_path / "l")]) == 2
    assert "holds a JSON list" in capsys.readouterr().err


def test_cli_converts_and_exports_a_scan_layers_adapter(tmp_path, capsys):
    """An adapter trained on a scan_layers=True model (stacked 'layers' subtrees, as from
    train.finetune --scan-layers): its layout is detected; PEFT and the merged export reproduce it."""
    from boft_jax.checkpoint import save_adapter

    module, params = base("vit", scan_layers=True)
    cfg = boft.BOFTConfig(block_size=4, n_factors=2, targets=vit.TARGET_PRESETS["attention"])
    wrapped = boft.wrap(module, cfg)
    ref = reference("vit_m2_head")
    adapter = boft.init_adapter(wrapped, params, ref["pixel_values"])
    adapter = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(a.size), a.shape, a.dtype), adapter)
    assert "layers" in adapter["encoder"]
    expected = wrapped.apply({"params": boft.combine(params, adapter)}, ref["pixel_values"])
    save_adapter(tmp_path / "a", adapter, cfg, metadata={"base_path": str(FIXTURES / "vit")})
    assert main(["export-merged", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 0
    merged_module, merged_params = hf.from_pretrained(tmp_path / "m")
    assert_close(merged_module.apply({"params": merged_params}, ref["pixel_values"]), expected)
    assert main(["convert", "--from", "boft", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "p")]) == 0
    peft_model, peft_params = load_peft_adapter(tmp_path / "p", *base("vit"))
    assert_close(peft_model.apply({"params": peft_params}, ref["pixel_values"]), expected)
    capsys.readouterr()


def test_export_merged_applies_a_recorded_image_size(tmp_path, capsys):
    """An adapter from train.finetune --image-size records the size: export-merged then writes a
    model of that size (as the run's merged/), with the base's preprocessor config resized; convert
    to PEFT says that PEFT records no size."""
    import shutil

    from boft_jax.checkpoint import save_adapter

    base_dir = tmp_path / "base"
    shutil.copytree(FIXTURES / "vit", base_dir)
    prep = {"do_resize": True, "size": {"height": 16, "width": 16}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (base_dir / "preprocessor_config.json").write_text(json.dumps(prep))
    module, params = hf.from_pretrained(base_dir)
    cfg = boft.BOFTConfig(block_size=4, n_factors=2, targets=vit.TARGET_PRESETS["attention"])
    wrapped = boft.wrap(module, cfg)
    x = jax.random.normal(jax.random.key(np.random.randint(2**31)), (3, 20, 28, 3))
    adapter = boft.init_adapter(wrapped, params, x[:1, :16, :16])
    adapter = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(a.size), a.shape, a.dtype), adapter)
    expected = wrapped.apply({"params": boft.combine(params, adapter)}, x, interpolate_pos_encoding=True)
    save_adapter(tmp_path / "a", adapter, cfg, metadata={"base_path": str(base_dir), "image_size": [20, 28]})
    assert main(["export-merged", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 0
    merged_module, merged_params = hf.from_pretrained(tmp_path / "m")
    assert merged_module.config.image_size == (20, 28)
    assert_close(merged_module.apply({"params": merged_params}, x), expected)
    assert json.loads((tmp_path / "m" / "preprocessor_config.json").read_text()) == {**prep, "size": {"height": 20, "width": 28}}
    capsys.readouterr()
    assert main(["convert", "--from", "boft", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "p")]) == 0
    assert "trained at 20x28 pixels" in capsys.readouterr().err
    # a base preprocessor this cannot resize (resize, then crop) is copied as it is, with a note
    cropped = {**prep, "crop_size": {"height": 14, "width": 14}, "do_center_crop": True}
    (base_dir / "preprocessor_config.json").write_text(json.dumps(cropped))
    assert main(["export-merged", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m2")]) == 0
    assert "copied unchanged" in capsys.readouterr().err
    assert json.loads((tmp_path / "m2" / "preprocessor_config.json").read_text()) == cropped


@pytest.mark.parametrize("command", [[], ["convert"], ["export-merged"]])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: python -m boft_jax.interop" in text
    if command:
        assert "--adapter" in text and "--out" in text and "--base" in text
    if command == ["convert"]:
        assert "--peft-type {BOFT,OFT}" in text


def test_cli_module_entry_point_and_no_torch():
    r = subprocess.run([sys.executable, "-m", "boft_jax.interop", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "convert" in r.stdout and "export-merged" in r.stdout
    code = "import sys, boft_jax.interop, boft_jax.interop.__main__; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_unknown_peft_type(tmp_path):
    bad = copy_fixture("vit_m1", tmp_path)
    edit_config(bad, peft_type="LORA")
    with pytest.raises(ValueError, match=r"peft_type 'LORA'.*only BOFT and OFT"):
        load_peft_adapter(bad, *base("vit"))


def test_pickled_weights_are_refused(tmp_path):
    bad = copy_fixture("vit_m1", tmp_path)
    (bad / peft_io.ADAPTER_WEIGHTS_NAME).unlink()
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.bin, a pickle.*never"):
        load_peft_adapter(bad, *base("vit"))


def test_missing_files_and_fan_in_fan_out(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_peft_adapter(tmp_path / "nope", *base("vit"))
    bad = copy_fixture("vit_m1", tmp_path)
    edit_config(bad, fan_in_fan_out=True)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        load_peft_adapter(bad, *base("vit"))


def test_modules_the_model_lacks_are_listed(tmp_path):
    bad = copy_fixture("vit_m1", tmp_path)

    def add(t):
        R, s = t["base_model.model.vit.layers.0.attention.q_proj.boft_R"], t["base_model.model.vit.layers.0.attention.q_proj.boft_s"]
        return {**t, "base_model.model.vit.layers.7.attention.q_proj.boft_R": R,
                "base_model.model.vit.layers.7.attention.q_proj.boft_s": s,
                "base_model.model.vit.pooler.dense.bias": s[:, 0]}

    edit_tensors(bad, add)
    with pytest.raises(ValueError, match=r"does not have \(1\)(?s:.*)vit\.layers\.7\.attention\.q_proj"):
        load_peft_adapter(bad, *base("vit"))
    # the pooler of a ViTModel checkpoint: a module the checkpoint has but this ViT leaves out, said as such
    pooled = copy_fixture("vit_m1", tmp_path / "pooler")
    edit_tensors(pooled, lambda t: {**t, "base_model.model.vit.pooler.dense.bias": t[
        "base_model.model.vit.layers.0.attention.q_proj.boft_s"][:, 0]})
    with pytest.raises(ValueError, match=r"vit\.pooler\.dense: the adapter trains the ViT pooler of a ViTModel checkpoint"):
        load_peft_adapter(pooled, *base("vit"))
    with pytest.raises(ValueError, match="does not have"):  # a T5 adapter on a ViT
        load_peft_adapter(PEFT / "t5_relu_m2", *base("vit"))


def test_blocks_that_do_not_fit_their_layer(tmp_path):
    bad = copy_fixture("vit_m1", tmp_path)

    def move(t):  # q_proj's (1, 8, 4, 4) blocks onto fc2, whose d_in is 64
        t = dict(t)
        t["base_model.model.vit.layers.0.mlp.fc2.boft_R"] = t.pop("base_model.model.vit.layers.0.attention.q_proj.boft_R")
        t["base_model.model.vit.layers.0.mlp.fc2.boft_s"] = t.pop("base_model.model.vit.layers.0.attention.q_proj.boft_s")
        return t

    edit_tensors(bad, move)
    with pytest.raises(ValueError, match=r"vit\.layers\.0\.mlp\.fc2 -> 'encoder/layer_0/mlp/fc2'.*k \* b = 8 \* 4 = 32.*d_in = 64"):
        with pytest.warns(UserWarning) as said:  # (the config no longer describes the file either way)
            load_peft_adapter(bad, *base("vit"))
    messages = " | ".join(str(w.message) for w in said)  # fc2's tensors unselected, q_proj's missing
    assert "does not select 1 module(s) whose BOFT tensors" in messages, messages
    assert "selects 1 module(s) for which the file holds no BOFT tensors, e.g. ['vit.layers.0.attention.q_proj']" in messages


def test_butterfly_structure_that_does_not_fit(tmp_path):
    bad = copy_fixture("vit_m1", tmp_path)
    rng = np.random.default_rng(0)

    def one_block(t):  # m = 2 with a single 32 x 32 block per factor: k = 1 is odd
        t = {k: v for k, v in t.items() if "boft_R" not in k}
        for k in list(t):
            if k.endswith("boft_s"):
                t[k.replace("boft_s", "boft_R")] = rng.standard_normal((2, 1, 32, 32)).astype(np.float32)
        return t

    edit_tensors(bad, one_block)
    edit_config(bad, boft_block_size=32, boft_n_butterfly_factor=2)
    with pytest.raises(ValueError, match=r"does not fit the butterfly structure(?s:.*)encoder/layer_0/attention/query.*even number of blocks"):
        load_peft_adapter(bad, *base("vit"))


def test_inconsistent_block_size_and_head_size(tmp_path):
    bad = copy_fixture("vit_m1", tmp_path)
    edit_config(bad, boft_block_size=8)
    with pytest.raises(ValueError, match="boft_block_size = 8 in the config, but the tensors hold blocks of size"):
        load_peft_adapter(bad, *base("vit"))
    with pytest.raises(ValueError, match=r"classifier.*num_labels"):
        load_peft_adapter(PEFT / "vit_m2_head", *base("vit", num_labels=7))


def test_scan_layers_needs_every_layer_adapted(tmp_path):
    bad = copy_fixture("vit_m1", tmp_path)
    edit_tensors(bad, lambda t: {k: v for k, v in t.items() if "layers.1." not in k})
    module, params = base("vit")
    missing = r"selects 2 module\(s\) for which the file holds no BOFT tensors, e.g. \['vit\.layers\.1\.attention\.q_proj'"
    with pytest.warns(UserWarning, match=missing):
        load_peft_adapter(bad, module, params)  # fine unrolled (layer 1 unadapted, said)
    with pytest.raises(ValueError, match=r"scan_layers=True(?s:.*)layer_\*/attention/query.*layers \[0\] of 2"):
        with pytest.warns(UserWarning, match=missing):
            load_peft_adapter(bad, *base("vit", scan_layers=True))


def test_save_refuses_what_peft_cannot_represent(tmp_path):
    import dataclasses

    model, params, _ = ours("ours_vit")
    neumann = boft.wrap(model.model, dataclasses.replace(model.config, cayley="neumann"))
    with pytest.raises(ValueError, match="exact Cayley"):
        save_peft_adapter(tmp_path / "a", neumann, params)
    with pytest.raises(TypeError, match="wrapped model"):
        save_peft_adapter(tmp_path / "a", model.model, params)
    assert not (tmp_path / "a").exists()


def test_adapted_new_head_with_no_base_weights_warns(tmp_path):
    """An adapted (not saved) classifier on a ViT loaded with a new num_labels: PEFT saved no base
    weights for it, so the fresh head is all zero here and the layer computes zero; said so."""
    path = copy_fixture("vit_m1", tmp_path)
    rng = np.random.default_rng(11)
    r = rng.standard_normal((1, 8, 4, 4)).astype(np.float32)

    def add_head(t):
        return {**t, f"{peft_io.PEFT_PREFIX}classifier.boft_R": r - np.swapaxes(r, -1, -2),
                f"{peft_io.PEFT_PREFIX}classifier.boft_s": (1 + 0.1 * rng.standard_normal((6, 1))).astype(np.float32)}

    edit_tensors(path, add_head)
    edit_config(path, target_modules=["q_proj", "v_proj", "classifier"])
    with pytest.warns(UserWarning, match=r"adapted layer\(s\) \['classifier'\] have an all-zero base kernel here.*modules_to_save"):
        model, params = load_peft_adapter(path, *base("vit", num_labels=6))
    assert boft.split(params, model.config)[1]["classifier"]["kernel"]["scale"].shape == (6,)
    with warnings.catch_warnings():  # the fixture itself (a trained base head): no such warning
        warnings.simplefilter("error")
        load_peft_adapter(PEFT / "vit_m1", *base("vit"))


def test_failed_export_over_an_existing_model_leaves_it_whole(tmp_path, capsys, monkeypatch):
    """export-merged --overwrite writes aside and swaps the directory in: a failure half-way (here a
    full disk after the first shard) leaves the previous export as it was, with no temporaries."""
    import boft_jax.models as models_mod

    base_dir = tmp_path / "base"
    shutil.copytree(FIXTURES / "vit", base_dir)
    ckpt, merged = tmp_path / "orbax", tmp_path / "merged"
    assert main(["convert", "--from", "peft", "--adapter", str(PEFT / "vit_m2_head"), "--base", str(base_dir), "--out", str(ckpt)]) == 0
    assert main(["export-merged", "--adapter", str(ckpt), "--out", str(merged), "--max-shard-bytes", "30000"]) == 0
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    real = models_mod.save_pretrained

    def full_disk(d, *args, **kwargs):
        real(d, *args, **kwargs)
        (Path(d) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models_mod, "save_pretrained", full_disk)
    assert main(["export-merged", "--adapter", str(ckpt), "--out", str(merged), "--overwrite"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_carries_the_bases_generation_and_tokenizer_files(tmp_path, capsys):
    base_dir = tmp_path / "base"
    shutil.copytree(FIXTURES / "mt5", base_dir)  # holds a generation_config.json
    (base_dir / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    (base_dir / "notes.txt").write_text("not a model file")
    ckpt = tmp_path / "orbax"
    assert main(["convert", "--from", "peft", "--adapter", str(PEFT / "mt5_oft_mixed"), "--base", str(base_dir),
                 "--out", str(ckpt)]) == 0
    assert main(["export-merged", "--adapter", str(ckpt), "--out", str(tmp_path / "m")]) == 0
    for name in ("generation_config.json", "tokenizer_config.json"):
        assert (tmp_path / "m" / name).read_bytes() == (base_dir / name).read_bytes()
    assert not (tmp_path / "m" / "notes.txt").exists()
    capsys.readouterr()
