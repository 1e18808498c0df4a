"""The catalogue of published measurements, its reader, the routing models and `moesim reproduce`."""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import pytest
from click.testing import CliRunner

from moesim.cli import cli
from moesim.errors import MoesimError
from moesim.reproduce.catalogue import CATALOGUE, COLUMNS, read_catalogue
from moesim.reproduce.routing import synthetic_trace
from moesim.reproduce.run import kendall_tau, predict


def _rows():
    return list(csv.DictReader(CATALOGUE.read_text().splitlines()))


def _write(tmp_path, rows):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    p = tmp_path / "cat.csv"
    p.write_text(buf.getvalue())
    return p


def test_bundled_catalogue_reads_and_covers_the_issues_sources():
    points = read_catalogue()
    sources = {p.source for p in points}
    assert {"study-table2", "moe-infinity-readme", "moe-infinity-paper", "fiddler-readme", "hybrimoe-table3",
            "ktransformers-doc", "llamacpp-issues", "bigmoeonedge"} <= sources
    study = [p for p in points if p.source == "study-table2"]
    assert len(study) >= 11 and {p.metric for p in study} == {"ttft_s", "tpot_s", "peak_mem_mib"}
    for p in points:  # a point either names its preset and routing, or says why it cannot be simulated
        assert p.unsimulable or (p.preset and p.routing)


@pytest.mark.parametrize("field,value,message", [
    ("metric", "latency", "field 'metric' = 'latency'"),
    ("value", "fast", "field 'value' = 'fast'"),
    ("knobs", "cache=3", "field 'knobs' = 'cache=3'"),
    ("prompt_tokens", "16|x", "field 'prompt_tokens'"),
    ("confidence", "sure", "field 'confidence'"),
    ("preset", "", "field 'preset' is empty on a simulable point"),
])
def test_reader_rejects_a_bad_row_with_one_line_naming_the_field(tmp_path, field, value, message):
    rows = _rows()[:3]
    rows[1][field] = value
    with pytest.raises(MoesimError, match="cat.csv line 3: " + message.replace("|", r"\|")):
        read_catalogue(_write(tmp_path, rows))


def test_reader_rejects_duplicate_ids_and_missing_columns(tmp_path):
    rows = _rows()[:2]
    rows[1]["id"] = rows[0]["id"]
    with pytest.raises(MoesimError, match="used twice"):
        read_catalogue(_write(tmp_path, rows))
    p = tmp_path / "bad.csv"
    p.write_text("id,source\nx,y\n")
    with pytest.raises(MoesimError, match="header lacks column"):
        read_catalogue(p)


@pytest.mark.parametrize("field,value,expected", [
    ("preset", "acelerate", "one of lru, .*accelerate"),
    ("preset", "lru+prefetch=oracel", "prefetch 'oracel': expected one of none, .*oracle"),
    ("gpu", "a600", "one of .*a6000"),
    ("host", "xeon-gold-6126", "one of xeon-gold-6126-x2, .*unstated"),
    ("link", "pcie-4", "one of pcie3, pcie4, pcie5"),
    ("routing", "mixtral-8x7b-publshed", "a bundled trace or routing model .*mixtral-8x7b-published"),
    ("model", "mixtral-8x7", "a bundled model config .*mixtral-8x7b"),
    ("expert_format", "int5", "bits \\(16, 8, 4, 3, 2\\)"),
    ("non_expert_format", "in4-g64", "bits \\(16, 8, 4, 3, 2\\)"),
])
def test_reader_rejects_an_unknown_name_on_a_simulable_point(tmp_path, field, value, expected):
    rows = _rows()[:3]
    assert not rows[1]["unsimulable"]
    rows[1][field] = value
    with pytest.raises(MoesimError, match=f"cat.csv line 3: field '{field}' = '{re.escape(value)}': .*{expected}"):
        read_catalogue(_write(tmp_path, rows))


def test_an_unknown_name_stops_reproduce_before_anything_is_simulated_or_written(tmp_path):
    rows = _rows()[:3]
    rows[2]["gpu"] = "a600"
    out = tmp_path / "pub.md"
    r = CliRunner().invoke(cli, ["reproduce", "--catalogue", str(_write(tmp_path, rows)), "--out", str(out)])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("moesim: error: cat.csv line 4: field 'gpu' = 'a600': expected one of")
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_names_are_checked_only_on_simulable_points_and_a_composed_policy_is_a_name(tmp_path):
    rows = _rows()[:2] + [next(r for r in _rows() if r["unsimulable"] and r["gpu"] == "oneplus-15r")]
    rows[1]["preset"] = "lru+prefetch=oracle"
    points = read_catalogue(_write(tmp_path, rows))
    assert points[1].preset == "lru+prefetch=oracle" and points[2].link == "ufs"


def test_routing_sources_are_real_traces_or_named_routing_models():
    from moesim.reproduce.routing import is_synthetic

    assert is_synthetic("mixtral-8x7b-published") and is_synthetic("iid-uniform")
    assert not is_synthetic("qwen3-30b-a3b-bigmoeonedge")
    t = synthetic_trace("mixtral-8x7b-published", "mixtral-8x7b", [8, 8], [20, 20])
    assert t.meta.source.kind == "synthetic" and t.meta.num_layers == 32
    again = synthetic_trace("mixtral-8x7b-published", "mixtral-8x7b", [8, 8], [20, 20])
    assert np.array_equal(again.cells.experts, t.cells.experts)  # deterministic
    u = synthetic_trace("iid-uniform", "deepseek-v2-lite", [4], [4])
    assert u.meta.top_k == 6 and (np.sort(u.cells.experts, axis=1)[:, 1:] != np.sort(u.cells.experts, axis=1)[:, :-1]).all()
    with pytest.raises(MoesimError, match="not model deepseek-v2-lite"):
        synthetic_trace("mixtral-8x7b-published", "deepseek-v2-lite", [4], [4])
    with pytest.raises(MoesimError, match="routing 'nope'"):
        synthetic_trace("nope", "mixtral-8x7b", [4], [4])


def test_kendall_tau():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0


def test_a_point_is_simulated_with_its_knobs_and_machine():
    p = next(p for p in read_catalogue() if p.id == "study-mi25-mem")
    o = predict(p)
    assert o.simulated and o.synthetic and "a6000" in o.profile
    assert abs(o.ratio - 1) < 0.10  # device_memory_ratio=0.25 of 48 GB, minus the dense weights
    unsim = next(p for p in read_catalogue() if p.id == "mir-switch-mi")
    assert predict(unsim).reason.startswith("no Switch-large-128 shape")
    # llama.cpp --n-cpu-moe: the knob keeps the first N layers' experts on the CPU of the stated machine
    ll = predict(next(p for p in read_catalogue() if p.id == "llamacpp-qwen3-36"))
    assert ll.simulated and "rtx-2080+i9-10900x" in ll.profile and 0.8 < ll.ratio < 1.0
    # KTransformers on DeepSeek-V3 (bundled config, multi-head latent attention): every routed expert on the
    # host CPU, at the server int4 rate fitted on one-socket decode points; on two sockets each expert is split,
    # the second socket adding the fitted gain (published: 1.40x the one-socket rate; an ideal split gave 1.67x)
    kt = predict(next(p for p in read_catalogue() if p.id == "kt-v02-1s"))
    assert kt.simulated and "rtx-4090d+xeon-gold-6454s" in kt.profile and 0.8 < kt.ratio < 1.1
    dual = predict(next(p for p in read_catalogue() if p.id == "kt-v02-2s"))
    assert 1.3 * kt.predicted < dual.predicted < 1.6 * kt.predicted


def test_reproduce_command_prints_and_writes_the_report(tmp_path):
    rows = [r for r in _rows() if r["id"] in ("study-mo4-mem", "study-mi25-mem", "mir-switch-mi")]
    cat = _write(tmp_path, rows)
    out = tmp_path / "pub.md"
    r = CliRunner().invoke(cli, ["reproduce", "--catalogue", str(cat), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "study-mo4-mem" in r.output and "no Switch-large-128 shape" in r.output
    text = out.read_text()
    assert "| study-mi25-mem |" in text and (tmp_path / "pub.png").exists()
    bad = CliRunner().invoke(cli, ["reproduce", "--catalogue", str(cat), "--source", "nope"])
    assert bad.exit_code == 2 and "no catalogue point matches" in bad.output


def test_the_report_names_the_catalogue_it_was_read_from(tmp_path):
    cat = _write(tmp_path, [r for r in _rows() if r["id"] == "mir-switch-mi"])
    out = tmp_path / "pub.md"
    r = CliRunner().invoke(cli, ["reproduce", "--catalogue", str(cat), "--out", str(out)])
    assert r.exit_code == 0, r.output
    head = out.read_text().splitlines()[2]
    assert f"from `{cat}`" in head and "reproduce/catalogue.csv" not in head


def test_a_profile_states_its_host_and_takes_its_cpu_side_from_it():
    from moesim.calib.hosts import (CPU_BF16_AVX2_FLOPS, CPU_BF16_KERNEL_FACTOR, CPU_MEMORY_EFFICIENCY,
                                    compose_profile)
    from moesim.modelspec import load_model_shape

    shape = load_model_shape("mixtral-8x7b")
    skylake = compose_profile("quadro-rtx-6000", "xeon-gold-6126-x2", "pcie3")
    zen3 = compose_profile("a6000", "threadripper-pro-5965wx", "pcie4")
    assert skylake.host.facts["isa"] == "avx512" and skylake.host.facts["stated"] is True
    assert "ASSUMED" in compose_profile("a6000").sources["host"]
    one = lambda p: float(p.cpu_expert_time(shape, np.array([1]), kernel="bf16")[0])  # noqa: E731
    # AVX-512 (oneDNN bf16 via fp32): at one token the slower of the channels (bytes / (socket bandwidth x
    # efficiency / factor)) and Fiddler's 7 ms per token on this socket; linear in tokens from there
    expert_bytes = 3 * 4096 * 14336 * 2
    eff = CPU_MEMORY_EFFICIENCY.value / CPU_BF16_KERNEL_FACTOR["avx512"].value
    assert one(skylake) == pytest.approx(max(expert_bytes / (6 * 21.33e9 * eff), 7e-3), rel=0.05)
    per_token = lambda p, n: float(p.cpu_expert_time(shape, np.array([n]), kernel="bf16")[0])  # noqa: E731
    assert per_token(skylake, 4) == pytest.approx(4 * 7e-3, rel=0.05)
    assert per_token(skylake, 16) == pytest.approx(16 * 7e-3, rel=0.05)
    # AVX2 in PyTorch <= 2.5: no bf16 GEMV; the fallback's own rate, whatever the socket's channels or cores
    assert one(zen3) == pytest.approx(expert_bytes / CPU_BF16_AVX2_FLOPS.value, rel=0.05)
    assert one(zen3) > 5 * one(skylake)
    four = float(zen3.cpu_expert_time(shape, np.array([4]), kernel="bf16")[0])
    assert four == pytest.approx(4 * one(zen3), rel=0.05)  # a scalar loop: linear in tokens
    serial = float(zen3.cpu_expert_time(shape, np.array([1]), kernel="bf16", threads=1)[0])
    assert serial == pytest.approx(one(zen3), rel=0.01)  # and on one thread whatever torch is allowed
    # PCIe Gen3 copies take longer than Gen4 (measured efficiencies per generation)
    assert skylake.copy_time(352e6, "h2d", pinned=True) > 1.8 * zen3.copy_time(352e6, "h2d", pinned=True)
    with pytest.raises(MoesimError, match="host 'nope'"):
        compose_profile("a6000", "nope")


def test_every_machine_in_the_catalogue_has_a_profile_but_the_phone():
    from moesim.calib.hosts import EXTRA_GPUS, HOSTS, UNSTATED, compose_profile
    from moesim.calib.specs import GPUS

    gpus = {g.name for g in GPUS + EXTRA_GPUS}
    machines = {(p.gpu, p.host, p.link, bool(p.unsimulable)) for p in read_catalogue()}
    for gpu, host, link, unsimulable in sorted(machines):
        if link == "ufs":  # BigMoeOnEdge's phone: no public spec of its SoC (the rows say so)
            continue
        if gpu not in gpus or (host != UNSTATED and host not in HOSTS):
            # a machine moesim has no spec for (an unstated GPU, a card not specified here) only on a row that
            # says why it cannot be simulated
            assert unsimulable, (gpu, host)
            continue
        profile = compose_profile(gpu, host, link or None)
        assert profile.cpu_expert_kernels == ("bf16", "int4"), (gpu, host)


def test_a_quantized_cpu_expert_streams_its_packed_bytes_whatever_the_instruction_set():
    from moesim.calib.hosts import CPU_QUANT_MEMORY_EFFICIENCY, FITTED_CPU_INT4_RATE, compose_profile
    from moesim.modelspec import load_model_shape

    shape = load_model_shape("mixtral-8x7b")
    packed = 3 * 4096 * 14336 * 4.5 / 8  # GGUF Q4_K: 4.5 bits per weight
    server = FITTED_CPU_INT4_RATE["server"]  # a Xeon Scalable socket streams at the rate fitted for servers
    for gpu, host, socket_bw, rate in (("quadro-rtx-6000", "xeon-gold-6126-x2", 6 * 21.33e9, server),
                                       ("a6000", "threadripper-pro-5965wx", 8 * 25.6e9, 1.0)):
        p = compose_profile(gpu, host)
        assert "int4" in p.cpu_expert_kernels and p.cpu_expert_model("int4").weight_bits_per_param == 4.5
        one = float(p.cpu_expert_time(shape, np.array([1]), kernel="int4")[0])
        # bandwidth-bound at one token: no bf16 up-conversion (AVX-512) or scalar fallback (AVX2) applies
        assert one == pytest.approx(5e-5 + packed / (socket_bw * CPU_QUANT_MEMORY_EFFICIENCY.value * rate), rel=0.02)
        assert one < float(p.cpu_expert_time(shape, np.array([1]), kernel="bf16")[0]) / 3


def test_a_link_trains_at_the_older_generation_of_card_and_host():
    from moesim.calib.hosts import compose_profile

    # Fiddler's Env2: a PCIe 4.0 L4 in a Cascade Lake server (PCIe 3.0 root ports) copies at Gen3 rates
    env2 = compose_profile("l4", "cascade-lake-32c", "pcie4")
    gen3 = compose_profile("quadro-rtx-6000", "xeon-gold-6126-x2", "pcie3")
    assert env2.name == "l4+cascade-lake-32c+pcie3"
    assert env2.copy_time(352e6, "h2d", pinned=True) == pytest.approx(gen3.copy_time(352e6, "h2d", pinned=True))
    assert compose_profile("a6000", "threadripper-pro-5965wx", "pcie4").name.endswith("+pcie4")
    assert compose_profile("a6000").name.endswith("+pcie4")  # its typical host (Zen 3) runs Gen4
    # the bundled L4 profile's own host (a Google Cloud G2 Cascade Lake) runs Gen3 too
    from moesim.calib.profile import load_profile

    assert load_profile("l4").device.facts["pcie_generation"] == 3


def test_simulate_takes_a_host_and_a_link():
    r = CliRunner().invoke(cli, ["simulate", "--profile", "quadro-rtx-6000", "--host", "xeon-gold-6126-x2",
                                 "--link", "pcie3", "--policy", "fiddler", "--trace", "gpt-oss-120b-bigmoeonedge"])
    assert r.exit_code == 0, r.output
    assert "quadro-rtx-6000+xeon-gold-6126-x2+pcie3" in r.output


def test_mixtral_offloading_peak_is_its_load_time_16bit_trunk():
    """The released build creates the trunk at 16 bits before swapping in HQQ attention; the freed blocks
    are still reserved when the expert cache is allocated, so that is the peak."""
    from moesim.modelspec import load_model_shape
    from moesim.reproduce.run import _config, point_profile, point_trace
    from moesim.simulator.memory import build_transient_bytes
    from moesim.simulator.presets import get_preset
    from moesim.simulator.run import simulate

    shape = load_model_shape("mixtral-8x7b")
    point = next(p for p in read_catalogue() if p.id == "study-mo2-mem")
    trace = point_trace(point, 64, 50, 2)
    m = simulate(trace, point_profile(point), _config(point, trace.meta.model)).memory
    trunk16 = shape.non_expert_params * 2
    assert m.total_bytes == trunk16 + m.cache_bytes + m.staging_bytes + m.prefetch_buffer_bytes + m.reserve_bytes
    assert predict(point).ratio == pytest.approx(1.0, abs=0.03)
    # no transient for a system built at its final format, or for a 16-bit trunk that stays 16-bit
    assert build_transient_bytes(get_preset("fiddler"), shape, trunk16 // 4, 0, 0) == 0
    assert build_transient_bytes(get_preset("mixtral-offloading"), shape, trunk16, 0, 0) == 0


def test_deepseek_v2_lite_routing_reproduces_the_published_lru_hit_rate():
    from moesim.reproduce.routing import DSL, DSL_CAPACITY, DSL_LRU25_HIT
    from moesim.tracer.stats import lru_hit_curve

    trace = synthetic_trace(DSL, "deepseek-v2-lite", [16] * 8, [256] * 8)
    assert (trace.meta.num_experts, trace.meta.model.top_k, trace.meta.num_layers) == (64, 6, 26)
    curve = lru_hit_curve(trace, "layer", "decode")
    assert abs(curve.hits[DSL_CAPACITY] / curve.accesses - DSL_LRU25_HIT) < 0.02  # B6: 47.7%
    uniform = lru_hit_curve(synthetic_trace("iid-uniform", "deepseek-v2-lite", [16] * 2, [128] * 2), "layer", "decode")
    assert uniform.hits[DSL_CAPACITY] / uniform.accesses < 0.3  # i.i.d. routing: about 16/64
    points = [p for p in read_catalogue() if p.model == "deepseek-v2-lite"]
    assert points and all(p.routing == DSL for p in points)


def test_the_systems_tau_counts_only_pairs_of_different_systems_on_one_model_and_machine():
    from dataclasses import replace

    from moesim.reproduce.run import Outcome, score

    base = next(p for p in read_catalogue() if p.is_speed and not p.unsimulable)

    def outcome(i, system, model, gpu, published, predicted):
        return Outcome(replace(base, id=i, system=system, model=model, gpu=gpu, value=published), predicted=predicted)

    outcomes = [
        outcome("x1", "X", "m", "g", 1.0, 1.0), outcome("x2", "X", "m", "g", 2.0, 0.5),  # X's own configs disagree
        outcome("y", "Y", "m", "g", 3.0, 3.0),
        outcome("z", "Z", "other-model", "g", 0.1, 9.0),  # another model: no pair with the rest
    ]
    s = score(outcomes)
    key = f"{base.source} {base.metric}"
    assert s.kendall_systems[key] == 1.0  # x1-y and x2-y agree; x1-x2 and every pair with z are not counted
    assert s.kendall[key] < 1.0  # every pair counts there


def test_scores_of_a_run_with_no_point_of_a_kind_print_its_count_not_nan():
    from moesim.reproduce.report import format_scores
    from moesim.reproduce.run import score

    lines = format_scores(score([]), {})
    assert lines == ["speed points (TPOT, tokens/s) simulated: 0", "peak memory points: 0", "TTFT points: 0"]


def test_iid_uniform_routing_can_route_fewer_experts_than_the_model():
    """KTransformers' "6 experts" runs route 6 of DeepSeek-V3's 256 experts per token where the model routes 8."""
    from moesim.reproduce.routing import iid_top_k, is_synthetic

    assert iid_top_k("iid-uniform-top6") == 6 and iid_top_k("iid-uniform") is None
    assert iid_top_k("iid-uniform-top0") is None and iid_top_k("iid-uniform-topx") is None
    assert is_synthetic("iid-uniform-top6")
    trace = synthetic_trace("iid-uniform-top6", "deepseek-v3", [3], [2])
    assert trace.meta.model.top_k == 6 and trace.meta.model.num_experts == 256
    with pytest.raises(MoesimError, match="more than model mixtral-8x7b's 8"):
        synthetic_trace("iid-uniform-top9", "mixtral-8x7b", [3], [2])
