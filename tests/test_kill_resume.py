"""Long jobs survive a kill with at most the unit in flight lost, and resume (#15 finding 7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from test_trace_capture import FAMILIES, GSM8K, build_model_folder
from moesim.tracer import read_trace


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("kill-model"), FAMILIES["mixtral"], seed=5)


def _trace_cmd(folder, out, limit=4):
    return [sys.executable, "-m", "moesim.cli", "trace", "--prompts", str(GSM8K), "--model", str(folder),
            "--limit", str(limit), "--max-new-tokens", "3", "--device", "cpu", "--no-progress", "--out", str(out)]


def _killed_at(call: int, folder, out) -> subprocess.CompletedProcess:
    """Run `moesim trace` in a process that SIGKILLs itself when generation call number ``call`` starts."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        import moesim.tracer.capture as capture
        real, n = capture.generate_one, [0]
        def gen(*a, **k):
            n[0] += 1
            if n[0] == {call}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        capture.generate_one = gen
        from moesim.cli import main
        main(sys.argv[1:])
    """)
    cmd = _trace_cmd(folder, out)
    return subprocess.run([sys.executable, "-c", code] + cmd[3:], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)


@pytest.mark.skipif(not GSM8K.exists(), reason="shared/data/gsm8k not present")
def test_sigkill_during_trace_keeps_finished_requests_and_a_rerun_resumes(model_folder, tmp_path):
    fresh = tmp_path / "fresh.parquet"
    r = subprocess.run(_trace_cmd(model_folder, fresh), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "killed.parquet"
    r = _killed_at(3, model_folder, out)  # two requests finished, the third in flight
    assert r.returncode == -signal.SIGKILL
    partial = read_trace(out)
    assert not partial.complete and partial.num_requests == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    r = subprocess.run(_trace_cmd(model_folder, out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stderr and "2 requests were already recorded" in r.stderr
    a, b = read_trace(out), read_trace(fresh)
    assert a.complete and a.num_requests == 4
    for col in ("request", "phase", "position", "layer", "experts", "token_id"):
        np.testing.assert_array_equal(getattr(a.cells, col), getattr(b.cells, col))


@pytest.mark.skipif(not GSM8K.exists(), reason="shared/data/gsm8k not present")
def test_a_resumed_trace_of_other_weights_starts_afresh_and_progress_is_plain_lines(model_folder, tmp_path):
    # the same family, config and tokenizer, other weights: only the weights' hash tells them apart
    other = build_model_folder(tmp_path / "other-model", FAMILIES["mixtral"], seed=6)
    fresh = tmp_path / "fresh.parquet"
    r = subprocess.run(_trace_cmd(other, fresh), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "killed.parquet"
    assert _killed_at(3, model_folder, out).returncode == -signal.SIGKILL
    assert read_trace(out).num_requests == 2
    cmd = [a for a in _trace_cmd(other, out) if a != "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "interrupted trace of other model weights" in r.stderr and "already recorded" not in r.stderr
    a, b = read_trace(out), read_trace(fresh)
    assert a.complete and a.meta.source.details["weights_sha256"] == b.meta.source.details["weights_sha256"]
    for col in ("request", "phase", "position", "layer", "experts", "token_id"):
        np.testing.assert_array_equal(getattr(a.cells, col), getattr(b.cells, col))
    # off a terminal, progress is plain lines with a rate, ending at the total
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("trace: ")]
    assert lines and "prompt/s" in lines[0] and lines[-1].startswith("trace: 4/4 prompt (100%)")


def test_a_stale_temp_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    from moesim.atomic import write_text_atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.json.{dead.pid}.abc123.tmp"
    stale.write_text("half")
    write_text_atomic(tmp_path / "out.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


WIKI = GSM8K.parents[1] / "wikitext-2"


@pytest.mark.skipif(not (WIKI / "test.txt").is_file(), reason="shared WikiText-2 not present")
def test_sigkill_during_demo_model_resumes_from_the_last_checkpoint_with_the_same_weights(tmp_path):
    micro = ("dataclasses.replace(QUICK, steps=6, warmup_steps=1, train_chars=40_000, eval_max_tokens=512, "
             "vocab_size=300, hidden_size=32, intermediate_size=64)")
    code = textwrap.dedent(f"""
        import dataclasses, os, signal, sys
        from moesim.quality.demo_model import QUICK, train_demo_model
        kill_at = sys.argv[2]
        def log(line):
            if kill_at and line.startswith(f"step {{kill_at}}/"):
                os.kill(os.getpid(), signal.SIGKILL)
            print(line, flush=True)
        train_demo_model(sys.argv[1], {micro}, log=log, checkpoint_every=2)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    fresh = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fresh"), ""], capture_output=True, text=True,
                           env=env, timeout=600)
    assert fresh.returncode == 0, fresh.stderr
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), "5"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / ".m.checkpoint.pt").is_file() and not (tmp_path / "m").exists()
    resumed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), ""], capture_output=True, text=True,
                             env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 4/6" in resumed.stdout
    assert "step 1/6" not in resumed.stdout  # the finished steps were not trained again
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (tmp_path / "fresh" / "model.safetensors").read_bytes()
    assert not (tmp_path / ".m.checkpoint.pt").exists()
