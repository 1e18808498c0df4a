"""Calibration: fits on synthetic data, kernels, device facts, and a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import TEST_DEVICE
from moesim.calib import facts, workload
from moesim.calib.calibrate import CalibOptions, calibrate, format_model_table, refit
from moesim.calib.fit import RooflineData, fit_copy, fit_roofline
from moesim.calib.kernels import ExpertFFN, Linear, probe_kernels
from moesim.calib.measure import Grids
from moesim.calib.profile import MeasuredPoint, MeasuredSeries, load_profile
from moesim.calib.timing import RepeatPolicy
from moesim.cli import cli
from moesim.errors import MoesimError
from moesim.modelspec import load_model_shape

TINY_CONFIG = {
    "model_type": "mixtral", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_local_experts": 4,
    "num_experts_per_tok": 2, "vocab_size": 128, "max_position_embeddings": 4096,
}


def _series(key, xs, times):
    pts = tuple(MeasuredPoint({"bytes": float(x)}, float(t), float(t), float(t), 5, float(t)) for x, t in zip(xs, times))
    return MeasuredSeries(key, "", None, {}, pts)


def test_copy_fit_recovers_latency_and_bandwidth():
    rng = np.random.default_rng(0)
    n = np.geomspace(4096, 512 * 2**20, 18)
    t = (12e-6 + n / 25e9) * (1 + 0.01 * rng.standard_normal(n.size))
    m = fit_copy(_series("copy/h2d/pinned/alone", n, t))
    assert m.bytes_per_s == pytest.approx(25e9, rel=0.03)
    assert m.latency_s == pytest.approx(12e-6, rel=0.15)
    assert m.loo_rel_error < 0.03 and m.n_points == 18
    assert (m.low_bytes, m.high_bytes) == (n.min(), n.max())


def test_roofline_fit_recovers_parameters_and_transfers_across_shapes():
    mixtral = load_model_shape("mixtral-8x7b")
    tok = np.array([1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256, 512], float)
    w = workload.expert_work(mixtral, tok, 16)
    t = 80e-6 + np.maximum(w.flops / 400e12, w.nbytes / 2.5e12)
    m = fit_roofline(RooflineData(w.flops, w.nbytes, t, {"tokens": tok}), "tokens")
    assert m.flops_per_s == pytest.approx(400e12, rel=0.05)
    assert m.bytes_per_s == pytest.approx(2.5e12, rel=0.05)
    assert m.latency_s == pytest.approx(80e-6, rel=0.2)
    assert m.loo_rel_error < 0.02
    assert {name for name, _ in m.alternatives} | {m.method} == {"roofline", "soft-roofline",
                                                                    "soft-roofline+correction"}
    # the same parameters predict another model's experts (roofline-shaped, not a lookup table)
    qwen = load_model_shape("qwen3-30b-a3b")
    w2 = workload.expert_work(qwen, tok, 16)
    truth = 80e-6 + np.maximum(w2.flops / 400e12, w2.nbytes / 2.5e12)
    pred = m.predict(w2, {"tokens": tok}, "test")
    assert np.max(np.abs(pred - truth) / truth) < 0.05


def test_decode_fit_gives_attention_its_own_roofline_and_round_trips():
    """A CPU-like layer: matrix products at 100 GFLOP/s, attention at 4 GFLOP/s. One shared roofline
    cannot fit both; the two-roofline candidate wins, recovers the attention rate and predicts another
    model's shape through the profile's serialised form."""
    from moesim.calib.profile import RooflineModel, _Fields

    mixtral = load_model_shape("mixtral-8x7b")
    b, c = (np.array(v, float) for v in zip(*[(b, c) for b in (1, 2, 4, 8, 16) for c in (16, 256, 1024, 4096)]))

    def truth(shape, b, c):
        w = workload.decode_work(shape, b, c)
        af = w.attention_share()
        return 2e-4 + np.maximum((w.flops - af) / 100e9, w.nbytes / 15e9) + af / 4e9

    w = workload.decode_work(mixtral, b, c)
    m = fit_roofline(RooflineData(w.flops, w.nbytes, truth(mixtral, b, c), {"batch": b, "context": c},
                                  w.attention_share()))
    assert m.method == "soft-roofline+attention" and m.loo_rel_error < 0.02
    assert m.attention_flops_per_s == pytest.approx(4e9, rel=0.1)
    assert dict(m.alternatives)["soft-roofline"] > 0.2  # the shared roofline misses by far
    loaded = RooflineModel.from_fields(_Fields(json.loads(json.dumps(m.to_dict())), "model", "test"))
    assert loaded == m
    qwen = load_model_shape("qwen3-30b-a3b")
    pred = loaded.predict(workload.decode_work(qwen, b, c), {"batch": b, "context": c}, "test")
    assert np.max(np.abs(pred - truth(qwen, b, c)) / truth(qwen, b, c)) < 0.05


def test_correction_candidate_wins_on_a_kinked_curve():
    tok = np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128], float)
    flops = 2e6 * tok
    nbytes = np.full_like(tok, 1e6)
    base = 1e-5 + np.maximum(flops / 1e11, nbytes / 1e10)
    bump = np.where((tok >= 12) & (tok <= 32), 1.25, 1.0)  # e.g. a kernel switching tiles
    m = fit_roofline(RooflineData(flops, nbytes, base * bump, {"tokens": tok}), "tokens")
    assert m.method == "soft-roofline+correction"
    assert m.loo_rel_error < dict(m.alternatives)["roofline"]


def test_kernels_probe_and_cuda_int8_path_on_cpu():
    ok, failed = probe_kernels(torch.device("cpu"), torch.bfloat16)
    assert set(ok) == {"bf16", "int8", "int4"}
    assert "int3" in failed and "int2" in failed
    # the W8A8 torch._int_mm path used on CUDA also runs on CPU: check it, short inputs padded
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    for rows in (3, 40):
        x = torch.randn(rows, 128, generator=g).to(torch.bfloat16)
        lin = Linear(w, "int8", torch.bfloat16, int8_mode="int_mm", keep_reference=True)
        y = lin(x).float()
        ref = x.float() @ lin.reference.t()
        assert y.shape == (rows, 64)
        assert float((y - ref).norm() / ref.norm()) < 0.03
    ffn = ExpertFFN(128, 256, "int4", torch.device("cpu"), torch.bfloat16, keep_reference=True)
    x = torch.randn(4, 128, generator=g).to(torch.bfloat16)
    assert float((ffn(x).float() - ffn.reference(x.float())).norm() / ffn.reference(x.float()).norm()) < 0.05


def test_device_selection_errors():
    assert facts.resolve_device("cpu").type == "cpu"
    with pytest.raises(MoesimError, match="--device 'tpu:0'"):
        facts.resolve_device("tpu:0")
    with pytest.raises(MoesimError, match="expected 'cpu' or 'cuda:N'"):
        facts.resolve_device("not a device")
    if not torch.cuda.is_available():
        with pytest.raises(MoesimError, match="CUDA is not available"):
            facts.resolve_device("cuda:0")


class _FailingNvml:
    def nvmlInit(self):
        raise RuntimeError("NVML Shared Library Not Found")


class _FakeNvml:
    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlSystemGetDriverVersion(self):
        return "580.1"

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("M", (), {"total": 85520809984})()

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        return 1980 if kind == 1 else 2619

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1755

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h):
        return 5

    def nvmlDeviceGetCurrPcieLinkWidth(self, h):
        return 16

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h):
        return 5

    def nvmlDeviceGetMaxPcieLinkWidth(self, h):
        return 16

    def nvmlDeviceGetPowerManagementLimit(self, h):
        raise RuntimeError("Not Supported")


def test_nvml_facts_absent_failing_and_present():
    assert "nvmlInit failed" in facts.nvml_facts(0, _FailingNvml())["nvml_error"]
    got = facts.nvml_facts(0, _FakeNvml())
    assert got["nvml_name"] == "NVIDIA H100 80GB HBM3" and got["pcie_generation"] == 5 and got["pcie_width"] == 16
    assert "power_limit_w" in got["nvml_query_errors"]
    sw = facts.software_versions()
    assert sw["torch"] == torch.__version__ and sw["transformers"]


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("cfg") / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    grids = Grids(
        expert_tokens=(1, 2, 4, 8, 16), cpu_expert_tokens=(1, 2, 4, 16), cpu_threads=(1,),
        copy_bytes=(65536, 262144, 2**20, 4 * 2**20), decode=((1, 16), (1, 128), (2, 64), (4, 128)),
        prefill_tokens=(4, 8, 16, 32), head_tokens=(1, 2, 4, 8),
        budget_expert_s=0.5, budget_cpu_expert_s=0.5, budget_copy_s=0.5, budget_non_expert_s=1, budget_head_s=0.3,
    )
    policy = RepeatPolicy(warmup=1, min_repeats=3, max_repeats=5, min_time_s=0.0, warmup_s=0.0)
    profile = calibrate(CalibOptions(device=TEST_DEVICE, model_config=str(cfg), quick=True, name="tiny-cpu", threads=1,
                                     grids=grids, policy=policy))
    path = profile.save(tmp_path_factory.mktemp("out") / "tiny.json")
    return profile, path, cfg


def test_tiny_calibration_round_trip(tiny_profile):
    profile, path, cfg = tiny_profile
    loaded = load_profile(path)
    assert loaded.to_json() == profile.to_json()
    assert loaded.name == "tiny-cpu" and not loaded.derived_from_specs and loaded.device.kind == TEST_DEVICE
    assert set(loaded.expert_kernels) == {"bf16", "int8", "int4"}
    if TEST_DEVICE == "cuda":  # the non-expert layer's kernels timed apart from its launches, never longer
        assert set(loaded.non_expert_device_models["bf16"]) == {"decode", "prefill"}
        for phase in ("decode", "prefill"):
            wall = {tuple(p.x.items()): p.median_s for p in loaded.series(f"non_expert/bf16/{phase}").points}
            for p in loaded.series(f"non_expert_device/bf16/{phase}").points:
                assert p.median_s <= 1.05 * wall[tuple(p.x.items())]
    else:  # the host is the device: nothing runs ahead
        assert loaded.non_expert_device_models == {} and "non_expert_device" not in loaded.to_dict()
    assert loaded.fit_statistic == ("median" if TEST_DEVICE == "cuda" else "p10")  # calib's "auto"
    shape = load_model_shape(str(cfg))
    assert loaded.expert_time(shape, 4) > 0 and loaded.cpu_expert_time(shape, 4, threads=1) > 0
    assert loaded.copy_time(2**20, "d2h", pinned=False, concurrent=True) > 0
    assert loaded.non_expert_time(shape, "decode", 1, 64, batch=2) > 0
    assert loaded.non_expert_time(shape, "prefill", 16, 16) > 0 and loaded.head_time(shape, 2) > 0
    keys = {s.key for s in loaded.measurements}
    assert {"expert/bf16", "cpu_expert/bf16/1t", "copy/h2d/pinned/alone", "non_expert/bf16/decode", "head",
            "overhead"} <= keys
    if loaded.device.kind == "cpu":  # copies and compute share the CPU: their mutual slowdowns are measured
        assert {"interference/compute", "interference/copy"} <= keys
        for key, factor in (("interference/compute", loaded.compute_slowdown_with_copy),
                            ("interference/copy", loaded.copy_slowdown_with_compute)):
            by = {p.x["partner"]: p.median_s for p in loaded.series(key).points}
            assert factor == round(max(1.0, by[1.0] / by[0.0]), 4), key  # the medians' ratio, never below 1
    for s in loaded.measurements:
        for p in s.points:
            assert p.p10_s <= p.median_s <= p.p90_s and p.repeats >= 3
    assert loaded.software["torch"] == torch.__version__
    table = format_model_table(loaded)
    assert "expert bf16" in table and "LOO mean" in table
    # every fitted model records its leave-one-out error
    assert all(row[3] is not None for row in __import__("moesim.calib.calibrate", fromlist=["x"]).model_rows(loaded))
    with pytest.raises(MoesimError, match="measured with \\[1\\] threads, not 2"):
        loaded.cpu_expert_time(shape, 1, threads=2)
    assert refit(loaded, "median").fit_statistic == "median"


def test_cli_errors_and_profiles_listing(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["calib", "--device", "tpu", "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 2 and "--device 'tpu'" in res.output
    assert not (tmp_path / "p.json").exists()
    # 0 is refused as -1 is (it meant "all cores", which is what leaving the flag out says)
    for threads in ("0", "-1"):
        res = runner.invoke(cli, ["calib", "--quick", "--threads", threads, "--out", str(tmp_path / "p.json")])
        assert res.exit_code == 2 and f"--threads {threads}: expected 1.." in res.output, res.output
    assert not (tmp_path / "p.json").exists()
    res = runner.invoke(cli, ["profiles"])
    assert res.exit_code == 0, res.output
    for name in ("h100-sxm", "rtx-3060", "t4", "a100-80gb"):
        assert name in res.output


def test_tiny_profile_has_launch_floors(tiny_profile):
    profile, _, cfg = tiny_profile
    shape = load_model_shape(str(cfg))
    keys = {s.key for s in profile.measurements}
    for kernel in profile.expert_kernels:
        assert f"floor/expert/{kernel}" in keys
        m = profile.expert_models[kernel].model
        assert m.floor_s > 0
        assert profile.expert_time(shape, 1, kernel) >= m.floor_s
