"""The installed transformers, as calib and the engine drive it: caches, keywords, failures, `moesim doctor`.

These run on whatever transformers a fresh install resolves, so an API change there fails here first
(pyproject's filterwarnings also turns transformers' FutureWarnings into errors).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from moesim.calib.layers import _decoder_layers, _rotary, decoder_step
from moesim.cli import cli
from moesim.doctor import package_statuses
from moesim.failures import StepFailure, culprit, reported_failures
from moesim.hfcompat import cache_argument, new_cache, returned_cache

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=64, max_position_embeddings=256,
            tie_word_embeddings=False, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def tiny_mixtral():
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(MixtralConfig(**TINY), dtype=torch.float32).eval()


def test_engine_decode_path_passes_the_cache_the_library_reads(tiny_mixtral):
    """Prefill then one cached decode step gives the logits of one uncached forward over all tokens.

    A cache passed under a keyword the installed forward ignores would decode the last token alone and
    give other logits, so this catches a renamed cache argument.
    """
    ids = torch.tensor([[3, 17, 5, 40, 9]])
    keyword = cache_argument(tiny_mixtral)
    with torch.no_grad():
        first = tiny_mixtral(input_ids=ids[:, :4], use_cache=True, logits_to_keep=1, **{keyword: None})
        cache = returned_cache(first)
        assert cache is not None and cache.get_seq_length() == 4
        step = tiny_mixtral(input_ids=ids[:, 4:], use_cache=True, logits_to_keep=1, **{keyword: cache})
        full = tiny_mixtral(input_ids=ids, use_cache=False).logits[:, -1]
    assert torch.allclose(step.logits[:, -1], full, atol=1e-5)


def test_calibration_decode_step_attends_to_a_fixed_past(tiny_mixtral):
    """Each timed call sees the same past length (the cache rewinds) and really attends to that past."""
    layer_idx = 1
    layer = _decoder_layers(tiny_mixtral)[layer_idx]
    hidden = torch.randn(2, 1, TINY["hidden_size"])
    outputs = {}
    for context in (0, 32):
        positions = torch.full((2, 1), context)
        pe = _rotary(tiny_mixtral)(hidden, positions)
        run = decoder_step(layer, hidden, pe, positions, layer_idx, context, seed=3)
        a, b, c = run(), run(), run()
        a, b, c = (o[0] if isinstance(o, tuple) else o for o in (a, b, c))
        assert torch.equal(a, b) and torch.equal(b, c)
        outputs[context] = a
    assert not torch.allclose(outputs[0], outputs[32])


def test_dynamic_cache_rewind_keeps_the_past_length():
    from moesim.hfcompat import PastContext

    seen = []

    def probe(cache):
        cache.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), 3)

    past = PastContext(3, 10, probe)
    for _ in range(3):
        probe(past.cache)
        seen.append(past.cache.get_seq_length(3))
        past.rewind()
    assert seen == [11, 11, 11] and past.cache.get_seq_length(3) == 10
    assert new_cache().get_seq_length() == 0


def test_library_failure_is_one_line_naming_step_library_and_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESIM_LOG_DIR", str(tmp_path))
    from transformers import AutoConfig

    with pytest.raises(StepFailure) as info:
        with reported_failures("calib") as steps:
            steps.wrap(lambda m: None)("non-expert layer (decode, prefill) ...")
            AutoConfig.for_model("no-such-architecture")  # refused inside transformers
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 1
    assert "calib: step 'non-expert layer (decode, prefill)' failed inside transformers" in message
    import transformers

    assert transformers.__version__ in message
    written = list(tmp_path.glob("moesim-calib-*.txt"))
    assert len(written) == 1 and str(written[0]) in message and "Traceback" in written[0].read_text()


def test_user_errors_pass_through_unchanged():
    from moesim.errors import MoesimError

    with pytest.raises(MoesimError) as info:
        with reported_failures("trace"):
            raise MoesimError("--prompts x.jsonl: no such file")
    assert type(info.value) is MoesimError and info.value.exit_code == 2


def _functions(module: str, source: str, **names) -> dict:
    """The functions of ``source``, run as if they were code of ``module`` (their frames carry its name)."""
    namespace = {"__name__": module, **names}
    exec(compile(source, f"/x/site-packages/{module.replace('.', '/')}.py", "exec"), namespace)
    return namespace


def _culprit_of(call) -> str:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - whatever the fake code raised
        return culprit(exc)[0]
    raise AssertionError("the call did not raise")


def test_culprit_names_the_library_whose_code_raised():
    library = _functions("transformers.models.fake", "def load():\n    raise ValueError('unknown architecture')")
    ours = _functions("moesim.tracer.fake", "def trace():\n    load()", load=library["load"])
    assert _culprit_of(ours["trace"]) == "transformers"


def test_culprit_names_moesim_for_its_own_bugs():
    ours = _functions("moesim.simulator.fake", "def step():\n    return {}['missing']")
    assert _culprit_of(ours["step"]) == "moesim"
    # a moesim hook that fails when a library calls it is moesim's bug, not the library's
    library = _functions("torch.nn.fake", "def forward(hook):\n    return hook()")
    assert _culprit_of(lambda: library["forward"](ours["step"])) == "moesim"
    # a moesim call that fails inside the standard library is moesim's too
    parse = _functions("moesim.calib.fake", "import json\ndef parse():\n    return json.loads('{')")
    assert _culprit_of(parse["parse"]) == "moesim"


def test_calib_cli_reports_a_library_failure_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESIM_LOG_DIR", str(tmp_path))
    import moesim.calib.calibrate as calibrate_module

    def broken(opts):
        opts.log("head ...")
        from transformers import AutoConfig

        AutoConfig.for_model("no-such-architecture")

    monkeypatch.setattr(calibrate_module, "calibrate", broken)
    out = tmp_path / "p.json"
    res = CliRunner().invoke(cli, ["calib", "--quick", "--out", str(out)])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("moesim: error:")]
    assert len(lines) == 1 and "step 'head' failed inside transformers" in lines[0]
    assert "Traceback" not in res.output and not out.exists()


def test_doctor_reports_versions_ranges_and_devices():
    res = CliRunner().invoke(cli, ["doctor"])
    assert res.exit_code == 0, res.output
    for name in ("torch", "transformers", "simpy", "pyarrow", "CUDA:", "NVML:"):
        assert name in res.output
    statuses = {s.name: s for s in package_statuses()}
    # the versions this suite runs on are the tested ones: a fresh install inside the declared ranges
    for name in ("torch", "transformers"):
        assert statuses[name].declared.count("<") == 1, f"{name} needs an upper bound at the newest tested minor"
        assert statuses[name].in_range, statuses[name].line()


def test_doctor_runs_as_a_command():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    res = subprocess.run([sys.executable, "-m", "moesim.cli", "doctor"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and "transformers" in res.stdout, res.stderr
