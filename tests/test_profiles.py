"""Bundled hardware profiles: loading, the contract's queries, malformed files, spec sanity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.calib.profile import HardwareProfile, bundled_profiles, load_profile
from moesim.errors import MoesimError
from moesim.modelspec import load_model_shape

SPEC_NAMES = ("rtx-3060", "rtx-3080-mobile", "rtx-4090", "t4", "l4", "a5000", "a6000", "a100-80gb", "h100-sxm")


@pytest.fixture(scope="module")
def mixtral():
    return load_model_shape("mixtral-8x7b")


def test_bundled_spec_profiles_exist_and_load():
    names = bundled_profiles()
    for name in SPEC_NAMES:
        assert name in names
        p = load_profile(name)
        assert p.name == name and p.derived_from_specs and p.device.kind == "cuda"
        assert {"bf16", "int8"} <= set(p.expert_kernels)
        assert p.sources["memory_bandwidth"] and p.sources["peak_flops"] and p.sources["pcie"]
        assert all("source" in e and e["source"] for e in p.efficiency.values())


def test_h100_copy_of_a_mixtral_expert_over_gen5(mixtral):
    p = load_profile("h100-sxm")
    nbytes = mixtral.expert_bytes("bfloat16")
    assert 350e6 < nbytes < 355e6
    t = p.copy_time(nbytes, "h2d", pinned=True)
    assert 5e-3 < t < 14e-3
    assert p.copy_time(nbytes, "h2d", pinned=False) > t
    assert p.copy_time(nbytes, "h2d", pinned=True, concurrent=True) > t
    # Gen3 on the 3060 host: a quarter of Gen5's link rate, at the efficiency measured on Gen3 (0.77) instead
    # of the H100's measured 0.91 on Gen5
    slow = load_profile("rtx-3060")
    ratio = (p.efficiency["pcie_pinned"]["value"] * 63.015) / (slow.efficiency["pcie_pinned"]["value"] * 15.754)
    assert slow.efficiency["pcie_pinned"]["value"] == pytest.approx(0.77)
    assert slow.copy_time(nbytes) == pytest.approx(ratio * t, rel=0.05)


def test_contract_queries_are_vectorised_and_sane(mixtral):
    p = load_profile("h100-sxm")
    tokens = np.array([0, 1, 4, 64, 512])
    t = p.expert_time(mixtral, tokens, "bf16")
    assert t.shape == tokens.shape and t[0] == 0.0
    assert np.all(np.diff(t[1:]) >= 0)
    assert isinstance(p.expert_time(mixtral, 1), float)
    # memory-bound at 1 token: the int4 kernel reads about a quarter of the bytes
    assert p.expert_time(mixtral, 1, "int4") < p.expert_time(mixtral, 1, "bf16")
    # H100 bf16 expert at 1 token: weights / HBM bandwidth ~ 0.1-0.3 ms
    assert 0.08e-3 < p.expert_time(mixtral, 1) < 0.3e-3
    assert p.cpu_expert_time(mixtral, 1) > p.expert_time(mixtral, 1)
    dec = p.non_expert_time(mixtral, "decode", 1, np.array([16, 1024, 8192]), batch=1)
    assert dec.shape == (3,) and np.all(np.diff(dec) > 0)
    pre = p.non_expert_time(mixtral, "prefill", 512, 512)
    assert pre > p.non_expert_time(mixtral, "prefill", 1, 1)
    assert p.head_time(mixtral, 1) > 0
    assert p.layer_overhead_s >= 0 and p.step_overhead_s >= 0
    assert p.runtime_reserve_bytes > 0 and p.host_memory_bytes > p.device.memory_bytes


def test_missing_kernel_names_it(mixtral):
    p = load_profile("t4")
    with pytest.raises(MoesimError, match="profile t4 has no int4 expert kernel"):
        p.expert_time(mixtral, 1, "int4")
    with pytest.raises(MoesimError, match="no int3 expert kernel"):
        load_profile("h100-sxm").expert_time(mixtral, 1, "int3")


def test_unknown_profile_and_bad_json(tmp_path):
    with pytest.raises(MoesimError, match="not a bundled profile"):
        load_profile("no-such-gpu")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MoesimError, match="not valid JSON"):
        load_profile(bad)


@pytest.mark.parametrize("path", [
    ("schema_version",), ("device",), ("device", "memory_bytes"), ("copy", "h2d/pinned/alone", "bytes_per_s"),
    ("expert", "bf16", "model", "latency_s"), ("non_expert", "bf16", "decode", "ranges"), ("overheads", "layer_s"),
    ("head", "flops_per_s"),
])
def test_malformed_profile_names_the_missing_field(tmp_path, path):
    data = json.loads(bundled_profiles()["h100-sxm"].read_text())
    node = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    f = tmp_path / "p.json"
    f.write_text(json.dumps(data))
    with pytest.raises(MoesimError, match=f"missing field '{'.'.join(path)}'"):
        load_profile(f)


def test_round_trip_is_byte_identical(tmp_path):
    p = load_profile("a100-80gb")
    out = p.save(tmp_path / "a.json")
    again = load_profile(out)
    assert again.to_json() == p.to_json()
    assert isinstance(again, HardwareProfile)


def test_error_extrapolation_is_loud(tmp_path, mixtral):
    data = json.loads(bundled_profiles()["h100-sxm"].read_text())
    model = data["expert"]["bf16"]["model"]
    model["ranges"] = [{"var": "tokens", "low": 1, "high": 64}]
    model["extrapolation"] = "error"
    f = tmp_path / "p.json"
    f.write_text(json.dumps(data))
    p = load_profile(f)
    assert p.expert_time(mixtral, 64) > 0
    with pytest.raises(MoesimError, match="tokens=65 is outside the measured range"):
        p.expert_time(mixtral, np.array([1, 65]))


def test_bundled_spec_profiles_match_the_generator():
    """The committed spec profiles are what `python -m moesim.calib.specs` builds from the measured ones."""
    from moesim.calib.specs import build_all

    used = load_profile("h100-sxm").sources["efficiency_profiles"].split(",")
    measured = {name: load_profile(name) for name in used if name}
    gpu = next((p for p in measured.values() if p.device.kind == "cuda"), None)
    cpu = next((p for p in measured.values() if p.device.kind == "cpu"), None)
    for profile in build_all(gpu, cpu):
        assert profile.to_json() == bundled_profiles()[profile.name].read_text(), profile.name


def test_spec_efficiencies_come_from_the_measured_h100():
    p = load_profile("h100-sxm")
    assert "h100-measured" in p.sources["efficiency_profiles"]
    for key in ("gpu_memory", "gpu_bf16_tensor", "pcie_pinned"):
        assert p.efficiency[key]["source"].startswith("measured"), key
        assert 0.3 < p.efficiency[key]["value"] <= 1.0
    measured = load_profile("h100-measured")
    assert not measured.derived_from_specs and measured.device.facts["pcie_generation"] == 5
    nbytes = load_model_shape("mixtral-8x7b").expert_bytes()
    # the spec profile's copy equals the measurement it was derived from
    assert p.copy_time(nbytes) == pytest.approx(measured.copy_time(nbytes), rel=0.05)


@pytest.mark.parametrize("content, expected", [
    (b"{not json", "not a JSON model config"),
    (b"[1, 2]", "expected a JSON object (a transformers config), found list"),
    (b"\xff\xfe\x00", "not a JSON model config"),
    (b'{"model_type": "no-such-architecture"}', "transformers cannot read this config (ValueError: "),
    (b'{"hidden_size": 8}', "missing field 'model_type'"),
])
def test_a_malformed_model_config_file_is_one_line_naming_it(tmp_path, content, expected):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(MoesimError) as err:
        load_model_shape(path)
    assert err.value.message.startswith(f"{path}: ") and expected in err.value.message
    assert "\n" not in err.value.message and len(err.value.message) < 300


def test_a_4bit_non_expert_layer_streams_its_packed_weights():
    """Spec profiles of sm80+ cards time 4-bit attention (HQQ, GGUF) with the int4 kernel's memory efficiency
    on the packed bytes; Turing cards have no int4 kernel and keep the 16-bit one."""
    from moesim.calib import workload

    shape = load_model_shape("mixtral-8x7b")
    a6000, t4 = load_profile("a6000"), load_profile("t4")
    assert "int4" in a6000.non_expert_models and "int4" not in t4.non_expert_models
    lat = a6000.non_expert_models["int4"]["decode"].latency_s
    bw = a6000.device.facts["memory_bandwidth_bytes_per_s"] * a6000.efficiency["gpu_int4_memory"]["value"]
    four = a6000.non_expert_time(shape, "decode", 1, 16, kernel="int4")
    packed = float(workload.decode_work(shape, 1, 16, 4.25).nbytes)
    assert four == pytest.approx(lat + packed / bw, rel=1e-6)
    assert packed < 0.3 * float(workload.decode_work(shape, 1, 16).nbytes)
    assert four < a6000.non_expert_time(shape, "decode", 1, 16, kernel="bf16")
