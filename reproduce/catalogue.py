"""The catalogue of published measurements (``catalogue.csv``): one row per published number.

Schema (every column is present on every row; empty means "not stated" or "not applicable"):

``id``                unique name of the point
``source``            the source table it comes from (the unit of leave-one-source-out)
``row``               its row in ../shared/research/published-measurements.md (or the file it was read from)
``system``            the system as the source names it
``preset``            the moesim preset that models it, or a composed policy (``lru+prefetch=oracle``; empty: no
                      preset; the point cannot be simulated)
``knobs``             the system's own settings: ``offload_per_layer=N``, ``device_memory_ratio=R``, ``n_cpu_moe=N``,
                      ``gpu_mem_mib=M`` (a GPU memory budget), separated by ``;``
``model``             model config name (``moesim/model_configs``)
``gpu`` / ``host`` / ``link``   the machine: GPU spec, host CPU (``unstated`` when the source does not say),
                      PCIe generation (``pcie3``/``pcie4``/``pcie5``)
``expert_format`` / ``non_expert_format``   weight formats (``16``, ``int2-g16-m8``, ...)
``batch``             requests decoded together
``prompt_tokens`` / ``output_tokens``   lengths; ``a|b|c`` lists a grid whose mean the source reports
``metric``            ``tpot_s``, ``ttft_s``, ``tokens_per_s`` (output tokens over prefill + decode),
                      ``decode_tokens_per_s`` or ``peak_mem_mib``
``value``             the published number, in the metric's unit
``routing``           a bundled trace name, or a routing model of :mod:`moesim.reproduce.routing`
``confidence``        the research catalogue's code (E-T, E-R, E-X, A-F, U, S, ...)
``citation``          where the number is printed
``assumed``           what the source leaves unstated and this row assumes
``unsimulable``       why moesim cannot simulate this point (empty when it can)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from moesim.errors import MoesimError

CATALOGUE = Path(__file__).resolve().parent / "catalogue.csv"
COLUMNS = ("id", "source", "row", "system", "preset", "knobs", "model", "gpu", "host", "link", "expert_format",
           "non_expert_format", "batch", "prompt_tokens", "output_tokens", "metric", "value", "routing",
           "confidence", "citation", "assumed", "unsimulable")
METRICS = {"tpot_s": "s", "ttft_s": "s", "tokens_per_s": "tok/s", "decode_tokens_per_s": "tok/s",
           "peak_mem_mib": "MiB"}
CONFIDENCES = ("E-T", "E-X", "E-R", "E-F", "A-F", "A-P", "U", "S", "S-AI")
KNOB_NAMES = ("offload_per_layer", "device_memory_ratio", "gpu_memory_fraction", "n_cpu_moe", "gpu_mem_mib")


@dataclass(frozen=True)
class Point:
    id: str
    source: str
    row: str
    system: str
    preset: str
    knobs: tuple[tuple[str, float], ...]
    model: str
    gpu: str
    host: str
    link: str
    expert_format: str
    non_expert_format: str
    batch: int
    prompts: tuple[int, ...]
    outputs: tuple[int, ...]
    metric: str
    value: float
    routing: str
    confidence: str
    citation: str
    assumed: str
    unsimulable: str

    @property
    def is_speed(self) -> bool:
        return self.metric in ("tpot_s", "tokens_per_s", "decode_tokens_per_s")


def _ints(text: str, where: str, field: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split("|"))
    except ValueError:
        raise MoesimError(f"{where}: field '{field}' = '{text}': expected integers separated by '|'") from None
    if any(v < 1 for v in vals):
        raise MoesimError(f"{where}: field '{field}' = '{text}': expected positive integers")
    return vals


def _knobs(text: str, where: str) -> tuple[tuple[str, float], ...]:
    out = []
    for part in filter(None, (x.strip() for x in text.split(";"))):
        name, sep, value = part.partition("=")
        if not sep or name not in KNOB_NAMES:
            raise MoesimError(f"{where}: field 'knobs' = '{part}': expected NAME=VALUE with NAME one of "
                              f"{', '.join(KNOB_NAMES)}")
        try:
            out.append((name, float(value)))
        except ValueError:
            raise MoesimError(f"{where}: field 'knobs' = '{part}': the value is not a number") from None
    return tuple(out)


def _one_of(names) -> str:
    names = list(dict.fromkeys(names))  # an error is one line: a long registry is cut short
    more = f", ... ({len(names)} in all)" if len(names) > 16 else ""
    return "one of " + ", ".join(names[:16]) + more


def _check_names(r: dict[str, str], where: str) -> None:
    """Every name a simulable row gives must exist: an unknown one would otherwise only show up as a point
    the report leaves unsimulated, its error buried in the point's note."""
    from moesim.calib.hosts import EXTRA_GPUS, HOSTS, LINKS, UNSTATED
    from moesim.calib.specs import GPUS
    from moesim.modelspec import bundled_model_configs
    from moesim.quant import SUPPORTED_BITS, WeightFormat
    from moesim.reproduce.routing import DSL, IID, is_synthetic
    from moesim.simulator.compose import policy_spec
    from moesim.tracer.routing import bundled_routing
    from moesim.traces import bundled_traces

    def bad(field: str, why: str) -> MoesimError:
        return MoesimError(f"{where}: field '{field}' = '{r[field]}': {why}")

    try:
        policy_spec(r["preset"], flag="")
    except MoesimError as exc:  # the parser's own words, less the string the field already names
        raise bad("preset", exc.message.removeprefix(f"policy '{r['preset']}': ")) from None
    gpus = [g.name for g in GPUS + EXTRA_GPUS]
    if r["gpu"] not in gpus:
        raise bad("gpu", f"expected {_one_of(gpus)}")
    if r["host"] != UNSTATED and r["host"] not in HOSTS:
        raise bad("host", f"expected {_one_of([*HOSTS, UNSTATED])}")
    if r["link"] and r["link"] not in LINKS:
        raise bad("link", f"expected {_one_of(LINKS)} (or empty: the GPU's own PCIe generation)")
    # files are read from the working directory, as the simulator reads a trace or a model config
    routing, model = r["routing"], Path(r["model"])
    if routing not in bundled_traces() and not is_synthetic(routing) and not Path(routing).is_file():
        names = [*bundled_traces(), *bundled_routing(), DSL, IID, f"{IID}-topK"]
        raise bad("routing", f"expected a bundled trace or routing model ({_one_of(names)}) or a trace file")
    configs = bundled_model_configs()
    local = (model.suffix == ".json" and model.is_file()) or (model / "config.json").is_file()
    if r["model"] not in configs and not local:
        raise bad("model", f"expected a bundled model config ({_one_of(sorted(configs))}) or a config file")
    for field in ("expert_format", "non_expert_format"):
        try:
            WeightFormat.parse(r[field])
        except MoesimError:
            raise bad(field, f"expected bits ({', '.join(map(str, SUPPORTED_BITS))}) or a name like int4-g64 "
                             f"or int2-g16-m8") from None


def parse_row(row: dict[str, str], where: str) -> Point:
    missing = [c for c in COLUMNS if row.get(c) is None]
    if missing:
        raise MoesimError(f"{where}: missing field '{missing[0]}'")
    r = {k: (row[k] or "").strip() for k in COLUMNS}
    for field in ("id", "source", "system", "metric", "value", "confidence", "citation"):
        if not r[field]:
            raise MoesimError(f"{where}: field '{field}' is empty")
    if r["metric"] not in METRICS:
        raise MoesimError(f"{where}: field 'metric' = '{r['metric']}': expected one of {', '.join(METRICS)}")
    if r["confidence"] not in CONFIDENCES:
        raise MoesimError(f"{where}: field 'confidence' = '{r['confidence']}': expected one of "
                          f"{', '.join(CONFIDENCES)}")
    try:
        value = float(r["value"])
    except ValueError:
        raise MoesimError(f"{where}: field 'value' = '{r['value']}': expected a number") from None
    if not value > 0:
        raise MoesimError(f"{where}: field 'value' = '{r['value']}': expected a positive number")
    simulable = not r["unsimulable"]
    if simulable:
        for field in ("preset", "model", "gpu", "host", "expert_format", "non_expert_format", "routing",
                      "prompt_tokens", "output_tokens", "batch"):
            if not r[field]:
                raise MoesimError(f"{where}: field '{field}' is empty on a simulable point (or say why in "
                                  f"'unsimulable')")
        _check_names(r, where)
    prompts = _ints(r["prompt_tokens"], where, "prompt_tokens") if r["prompt_tokens"] else ()
    outputs = _ints(r["output_tokens"], where, "output_tokens") if r["output_tokens"] else ()
    batch = _ints(r["batch"], where, "batch")[0] if r["batch"] else 1
    return Point(r["id"], r["source"], r["row"], r["system"], r["preset"], _knobs(r["knobs"], where), r["model"],
                 r["gpu"], r["host"], r["link"], r["expert_format"], r["non_expert_format"], batch, prompts,
                 outputs, r["metric"], value, r["routing"], r["confidence"], r["citation"], r["assumed"],
                 r["unsimulable"])


def read_catalogue(path: str | Path = CATALOGUE) -> list[Point]:
    from moesim.atomic import note_input

    path = Path(path)
    note_input(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MoesimError(f"{path}: cannot read the catalogue ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise MoesimError(f"{path}: not a UTF-8 CSV catalogue ({exc.reason} at byte {exc.start})") from None
    reader = csv.DictReader(text.splitlines())
    header = tuple(reader.fieldnames or ())
    absent = [c for c in COLUMNS if c not in header]
    if absent:
        raise MoesimError(f"{path}: header lacks column '{absent[0]}'")
    points, seen = [], set()
    for i, row in enumerate(reader, start=2):
        where = f"{path.name} line {i}"
        if None in row:
            raise MoesimError(f"{where}: more fields than the header's {len(header)}")
        p = parse_row(row, where)
        if p.id in seen:
            raise MoesimError(f"{where}: field 'id' = '{p.id}' is used twice")
        seen.add(p.id)
        points.append(p)
    return points
