"""Kill long commands with SIGKILL at random points, rerun them, and count what survived.

For each command (``sweep``, ``trace``, ``demo-model``, ``calib``) the script first times one
uninterrupted run, then ``--points`` times: starts the command in a fresh folder, SIGKILLs it at a random
moment inside that time (every other kill among the units of work, after the start-up), checks every file it left (each must be readable by moesim's own reader; hidden
temp files are counted apart), reruns the same command to completion and compares the result with the
uninterrupted run. It reports per command:

- resumed: reruns that finished and reproduced the uninterrupted result exactly;
- units lost: units of work the killed process had finished but its files do not keep (a sweep
  configuration, a traced request, a demo-model checkpoint block of training steps, a calib measurement
  unit); the bound is the one
  unit in flight;
- unreadable files: files left by the kill that moesim cannot read (temp files counted separately, and
  checked to be gone after the rerun);
- tracebacks: Python tracebacks printed by the killed run or the rerun.

A small wrapper counts the units a process finished (a line per unit in a side file, written before the
unit's result is handed on), so "finished but not kept" is measured, not assumed.

    python benchmarks/fault_injection.py [--points 20] [--commands sweep,trace,demo-model,calib] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GSM8K = SHARED / "data" / "gsm8k" / "test.jsonl"
WIKI = SHARED / "data" / "wikitext-2" / "test.txt"

# Each wrapper patches the function that finishes one unit so that it appends a line to $UNITS_LOG once the
# unit is computed (before the command saves it), then runs the command.
WRAP_SWEEP = """
import os, sys
import moesim.simulator.sweep as sweep
real = sweep.run_point
def counted(point):
    row = real(point)
    with open(os.environ["UNITS_LOG"], "a") as f:
        f.write("1\\n")
    return row
sweep.run_point = counted
from moesim.cli import main
main(sys.argv[1:])
"""
WRAP_TRACE = """
import os, sys
import moesim.tracer.capture as capture
real = capture.record_request
def counted(*a, **k):
    out = real(*a, **k)   # generated and saved
    with open(os.environ["UNITS_LOG"], "a") as f:
        f.write("1\\n")
    return out
real_gen = capture.generate_one
def gen(*a, **k):
    out = real_gen(*a, **k)  # generated, not yet saved: a finished unit of work
    with open(os.environ["UNITS_LOG"] + ".generated", "a") as f:
        f.write("1\\n")
    return out
capture.generate_one = gen
capture.record_request = counted
from moesim.cli import main
main(sys.argv[1:])
"""
WRAP_DEMO = """
import dataclasses, os, sys
from moesim.quality.demo_model import QUICK, train_demo_model
cfg = dataclasses.replace(QUICK, steps=int(os.environ["DEMO_STEPS"]), warmup_steps=1, train_chars=20_000, eval_max_tokens=128, vocab_size=300,
                          hidden_size=32, intermediate_size=64)
def log(line):
    if line.startswith("step "):
        with open(os.environ["UNITS_LOG"], "a") as f:
            f.write(line.split()[1].split("/")[0] + "\\n")
train_demo_model(sys.argv[1], cfg, log=log, checkpoint_every=int(os.environ["DEMO_BLOCK"]))
"""
# calib: the real command at a tiny Mixtral shape, on a small grid with 3 repeats a point (the quick grid's copies
# and repeats would make 20 kills and reruns take an hour on a shared 2-core machine; what is journaled and resumed
# is the same)
WRAP_CALIB = """
import os, sys
import dataclasses
import moesim.calib.calibrate as calibrate
from moesim.calib.journal import CalibJournal
from moesim.calib.measure import Grids
from moesim.calib.timing import RepeatPolicy
calibrate.grids_for = lambda device, quick, cores: Grids(
    expert_tokens=(1, 2, 4, 8, 16), cpu_expert_tokens=(1, 4, 16), cpu_threads=(cores,),
    copy_bytes=(65536, 262144, 1048576, 4194304), decode=((1, 16), (1, 128), (2, 64), (4, 128)),
    prefill_tokens=(4, 8, 16, 32), head_tokens=(1, 2, 4, 8), budget_expert_s=1, budget_cpu_expert_s=1,
    budget_copy_s=1, budget_non_expert_s=1, budget_head_s=1)
RepeatPolicy.quick = classmethod(lambda cls: RepeatPolicy(warmup=1, min_repeats=3, max_repeats=3, min_time_s=0.0,
                                                          warmup_s=0.0))
real_store = CalibJournal.store
def store(self, key, unit, payload):
    with open(os.environ["UNITS_LOG"], "a") as f:   # measured, not yet journaled: a finished unit of work
        f.write(unit + "\\n")
    return real_store(self, key, unit, payload)
CalibJournal.store = store
from moesim.cli import main
main(sys.argv[1:])
"""
CALIB_CONFIG = {
    "model_type": "mixtral", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_local_experts": 4,
    "num_experts_per_tok": 2, "vocab_size": 1024, "max_position_embeddings": 4096,
}
DEMO_STEPS = 20  # a tiny model (hidden 32, 20 steps): the start-up dominates, so 20 kills take minutes
DEMO_BLOCK = 2  # steps per checkpoint: the demo-model's unit of work


@dataclass
class Kill:
    at_s: float
    finished_units: int
    kept_units: int
    unreadable: list[str]
    temps: list[str]
    tracebacks: int
    resumed: bool
    temps_after: list[str]
    note: str = ""

    @property
    def lost(self) -> int:
        return max(0, self.finished_units - self.kept_units)


@dataclass
class Summary:
    command: str
    unit: str
    bound: int
    fresh_s: float
    kills: list[Kill] = field(default_factory=list)


def env_for(log: Path) -> dict:
    return dict(os.environ, UNITS_LOG=str(log), PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error",
                HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DEMO_STEPS=str(DEMO_STEPS), DEMO_BLOCK=str(DEMO_BLOCK))


def lines(path: Path) -> list[str]:
    try:
        return [l for l in path.read_text().splitlines() if l.strip()]
    except FileNotFoundError:
        return []


class Command:
    name = ""
    unit = ""
    bound = 1

    def __init__(self, base: Path):
        self.base = base

    def argv(self, work: Path) -> list[str]:
        raise NotImplementedError

    def finished(self, log: Path) -> int:
        return len(lines(log))

    def kept(self, work: Path) -> int:
        raise NotImplementedError

    def unreadable(self, work: Path) -> list[str]:
        raise NotImplementedError

    def same_as_fresh(self, work: Path, fresh: Path) -> bool:
        raise NotImplementedError


class SweepCommand(Command):
    name, unit, bound = "sweep", "configuration", 1

    def argv(self, work):
        return [sys.executable, "-c", WRAP_SWEEP, "sweep", "--trace", "qwen3-30b-a3b-bigmoeonedge", "--policy",
                "lru,lfu,fifo,fiddler,mixtral-offloading", "--cache-experts", "6,12,24,48", "--jobs", "1",
                "--no-progress", "--out", str(work / "out")]

    def kept(self, work):
        from moesim.simulator.sweep import read_store

        return len(read_store(work / "out"))

    def unreadable(self, work):
        import pyarrow.parquet as pq

        from moesim.simulator.sweep import list_grids, read_store

        bad = []
        out = work / "out"
        try:
            read_store(out)
            list_grids(out)
        except Exception as exc:  # noqa: BLE001
            bad.append(f"store ({exc})")
        for p in out.rglob("*"):
            if not p.is_file() or p.name.endswith(".tmp"):
                continue
            try:
                if p.suffix == ".parquet":
                    pq.read_table(p)
                elif p.suffix == ".json":
                    json.loads(p.read_text())
                elif p.suffix == ".csv":
                    p.read_text().splitlines()[0]
                elif p.suffix == ".png":
                    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            except Exception:  # noqa: BLE001
                bad.append(str(p.relative_to(work)))
        return bad

    def same_as_fresh(self, work, fresh):
        return (work / "out" / "sweep.csv").read_bytes() == (fresh / "out" / "sweep.csv").read_bytes()


class TraceCommand(Command):
    name, unit, bound = "trace", "request", 1

    def __init__(self, base):
        super().__init__(base)
        sys.path.insert(0, str(REPO / "tests"))
        from test_trace_capture import FAMILIES, build_model_folder

        self.model = build_model_folder(base / "model", FAMILIES["mixtral"], seed=5)

    def argv(self, work):
        return [sys.executable, "-c", WRAP_TRACE, "trace", "--prompts", str(GSM8K), "--model", str(self.model),
                "--limit", "12", "--max-new-tokens", "24", "--device", "cpu", "--no-progress",
                "--out", str(work / "t.parquet")]

    def finished(self, log):
        return len(lines(Path(str(log) + ".generated")))

    def kept(self, work):
        from moesim.tracer import read_trace

        p = work / "t.parquet"
        return read_trace(p).num_requests if p.exists() else 0

    def unreadable(self, work):
        from moesim.tracer import read_trace

        bad = []
        for p in work.glob("*.parquet"):
            try:
                read_trace(p)
            except Exception:  # noqa: BLE001
                bad.append(p.name)
        return bad

    def same_as_fresh(self, work, fresh):
        import numpy as np

        from moesim.tracer import read_trace

        a, b = read_trace(work / "t.parquet"), read_trace(fresh / "t.parquet")
        return a.complete and all(np.array_equal(getattr(a.cells, c), getattr(b.cells, c))
                                  for c in ("request", "phase", "position", "layer", "experts", "weights", "token_id"))


class DemoCommand(Command):
    name, unit, bound = "demo-model", f"training step (checkpoint every {DEMO_BLOCK})", DEMO_BLOCK

    def argv(self, work):
        return [sys.executable, "-c", WRAP_DEMO, str(work / "m")]

    def finished(self, log):
        done = [int(x) for x in lines(log)]
        return max(done) if done else 0  # steps

    def kept(self, work):
        import torch

        if (work / "m" / "demo_report.json").exists():
            return DEMO_STEPS
        ckpt = work / ".m.checkpoint.pt"
        return int(torch.load(ckpt, map_location="cpu", weights_only=False)["step"]) if ckpt.exists() else 0

    def unreadable(self, work):
        import torch

        bad = []
        ckpt = work / ".m.checkpoint.pt"
        if ckpt.exists():
            try:
                torch.load(ckpt, map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001
                bad.append(ckpt.name)
        if (work / "m").exists():
            try:
                json.loads((work / "m" / "demo_report.json").read_text())
            except Exception:  # noqa: BLE001
                bad.append("m/demo_report.json")
        return bad

    def same_as_fresh(self, work, fresh):
        return (work / "m" / "model.safetensors").read_bytes() == (fresh / "m" / "model.safetensors").read_bytes()


class CalibCommand(Command):
    """`moesim calib --device cpu --quick` at a tiny Mixtral-shaped config; the unit is one journaled measurement
    (a kernel's timing group, one copy size, a layer phase, the head, the overheads)."""

    name, unit, bound = "calib", "measurement unit", 1

    def __init__(self, base):
        super().__init__(base)
        self.config = base / "calib-config.json"
        self.config.write_text(json.dumps(CALIB_CONFIG))

    def argv(self, work):
        return [sys.executable, "-c", WRAP_CALIB, "calib", "--device", "cpu", "--quick", "--model-config",
                str(self.config), "--out", str(work / "p.json")]

    def _journal(self, work):
        return work / ".p.json.calib-journal.json"

    def kept(self, work):
        if (work / "p.json").exists():  # the profile holds every unit measured
            return len(lines(work / "units.log"))
        j = self._journal(work)
        return len(json.loads(j.read_text())["units"]) if j.exists() else 0

    def unreadable(self, work):
        from moesim.calib.profile import load_profile

        bad = []
        if (work / "p.json").exists():
            try:
                load_profile(str(work / "p.json"))
            except Exception:  # noqa: BLE001
                bad.append("p.json")
        j = self._journal(work)
        if j.exists():
            try:
                json.loads(j.read_text())["units"]
            except Exception:  # noqa: BLE001
                bad.append(j.name)
        return bad

    def before_rerun(self, work):
        j = self._journal(work)
        self.journaled = json.loads(j.read_text())["units"] if j.exists() else {}

    def same_as_fresh(self, work, fresh):
        """Timings differ from run to run, so: the same series as the uninterrupted run, the journal gone, and
        every series of a kept unit in the profile exactly as journaled (resumed, not measured again)."""
        from moesim.calib.profile import load_profile

        p, f = load_profile(str(work / "p.json")), load_profile(str(fresh / "p.json"))
        if sorted(s.key for s in p.measurements) != sorted(s.key for s in f.measurements):
            return False
        have = [s.to_dict() for s in p.measurements]
        kept = [s for u in getattr(self, "journaled", {}).values() for s in u["payload"].get("series", [])]
        return not self._journal(work).exists() and all(s in have for s in kept)


COMMANDS = {"sweep": SweepCommand, "trace": TraceCommand, "demo-model": DemoCommand, "calib": CalibCommand}


def temps(work: Path) -> list[str]:
    return sorted(str(p.relative_to(work)) for p in work.rglob("*.tmp"))


def run_to_end(cmd: Command, work: Path, log: Path) -> tuple[int, str]:
    r = subprocess.run(cmd.argv(work), capture_output=True, text=True, env=env_for(log), timeout=1800)
    return r.returncode, r.stdout + r.stderr


def timed_fresh_run(cmd: Command, work: Path) -> tuple[int, str, float, float]:
    """Run to the end; also return when the first unit finished, so kills can land among the units
    rather than in the start-up (imports, model load) that leaves nothing to lose."""
    log = work / "units.log"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd.argv(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_for(log))
    first = None
    while proc.poll() is None:
        if first is None and cmd.finished(log) > 0:
            first = time.perf_counter() - t0
        time.sleep(0.05)
    out, err = proc.communicate()
    total = time.perf_counter() - t0
    return proc.returncode, out + err, total, first if first is not None else 0.0


def _wait_for_units(cmd: Command, proc: subprocess.Popen, log: Path, units: int, then_s: float) -> bool:
    """Wait until ``units`` units have finished, then ``then_s`` more seconds; False if the process ended first."""
    while proc.poll() is None and cmd.finished(log) < units:
        time.sleep(0.02)
    try:
        proc.wait(timeout=then_s)
        return False
    except subprocess.TimeoutExpired:
        return True


def kill_once(cmd: Command, work: Path, fresh: Path, at_s: float, at_unit: tuple[int, float] | None = None) -> Kill:
    """SIGKILL the command ``at_s`` seconds after its start, or (``at_unit``) once it has finished that many
    units plus some seconds, so a kill lands among the units whatever the machine's load."""
    log = work / "units.log"
    proc = subprocess.Popen(cmd.argv(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_for(log))
    if at_unit is not None:
        alive = _wait_for_units(cmd, proc, log, *at_unit)
    else:
        try:
            proc.wait(timeout=at_s)
            alive = False
        except subprocess.TimeoutExpired:
            alive = True
    note = ""
    if alive:
        proc.send_signal(signal.SIGKILL)
    else:
        note = "finished before the kill"
    out, err = proc.communicate()
    finished = cmd.finished(log)
    kept = cmd.kept(work)
    unreadable = cmd.unreadable(work)
    getattr(cmd, "before_rerun", lambda w: None)(work)
    left = temps(work)
    tracebacks = (out + err).count("Traceback")
    log.unlink(missing_ok=True)
    Path(str(log) + ".generated").unlink(missing_ok=True)
    rc, text = run_to_end(cmd, work, work / "rerun.log")
    tracebacks += text.count("Traceback")
    resumed = rc == 0 and cmd.same_as_fresh(work, fresh)
    return Kill(at_s, finished, kept, unreadable, left, tracebacks, resumed, temps(work), note)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20, help="kills per command")
    parser.add_argument("--commands", default="sweep,trace,demo-model,calib", help=f"of {', '.join(COMMANDS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--by-units", action="store_true",
                        help="kill after a random number of finished units (robust to a loaded machine's timing) "
                             "instead of at a random time")
    args = parser.parse_args()
    names = [c.strip() for c in args.commands.split(",") if c.strip()]
    for n in names:
        if n not in COMMANDS:
            parser.error(f"--commands: unknown '{n}'")
    if "trace" in names and not GSM8K.exists():
        parser.error(f"trace needs {GSM8K}")
    if "demo-model" in names and not WIKI.exists():
        parser.error(f"demo-model needs {WIKI}")
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="moesim-faults-"))
    summaries = []
    try:
        for name in names:
            cmd = COMMANDS[name](base)
            fresh = base / f"{name}-fresh"
            fresh.mkdir()
            rc, text, fresh_s, first_s = timed_fresh_run(cmd, fresh)
            if rc != 0:
                print(f"{name}: the uninterrupted run failed (exit {rc}): {text.strip().splitlines()[-1:]}")
                continue
            s = Summary(name, cmd.unit, cmd.bound, fresh_s)
            total_units = cmd.finished(fresh / "units.log")
            for i in range(args.points):
                work = base / f"{name}-{i}"
                work.mkdir()
                at_unit = None
                if args.by_units:  # after a random number of finished units, a random moment into the next
                    at_unit = (rng.randrange(0, max(1, total_units)), rng.uniform(0.0, 2.0 * fresh_s / max(1, total_units)))
                    at, where = at_unit[1], f"unit {at_unit[0]:2d} +{at_unit[1]:4.1f}s"
                else:
                    # half the kills anywhere in the run, half among the units (after the first one finished)
                    lo = 0.05 * fresh_s if i % 2 == 0 else 0.9 * first_s
                    at = rng.uniform(lo, 0.95 * fresh_s)
                    where = f"{at:5.1f}s"
                k = kill_once(cmd, work, fresh, at, at_unit)
                s.kills.append(k)
                print(f"{name} kill {i + 1:2d} at {where}: finished {k.finished_units}, kept {k.kept_units}, "
                      f"lost {k.lost}, unreadable {len(k.unreadable)}, temp files {len(k.temps)} "
                      f"(after rerun {len(k.temps_after)}), tracebacks {k.tracebacks}, "
                      f"resumed {'yes' if k.resumed else 'NO'} {k.note}", flush=True)
                shutil.rmtree(work, ignore_errors=True)
            summaries.append(s)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print("| command | unit | kills | runs resumed (same result) | units lost (max; bound) | unreadable files | "
          "temp files left after the kill / after the rerun | tracebacks | uninterrupted run |")
    print("|---|---|---:|---:|---|---:|---|---:|---:|")
    ok = True
    for s in summaries:
        n = len(s.kills)
        resumed = sum(k.resumed for k in s.kills)
        lost = [k.lost for k in s.kills]
        unreadable = sum(len(k.unreadable) for k in s.kills)
        tb = sum(k.tracebacks for k in s.kills)
        t_kill = sum(len(k.temps) for k in s.kills)
        t_after = sum(len(k.temps_after) for k in s.kills)
        print(f"| {s.command} | {s.unit} | {n} | {resumed}/{n} | total {sum(lost)}, max {max(lost, default=0)}; "
              f"bound {s.bound} | {unreadable} | {t_kill} / {t_after} | {tb} | {s.fresh_s:.1f} s |")
        ok &= resumed == n and max(lost, default=0) <= s.bound and unreadable == 0 and tb == 0 and t_after == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
