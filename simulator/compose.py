"""A policy as one string: a preset with some of its parts replaced, e.g. ``lru+prefetch=oracle+scope=global``.

Every command that names a policy (``simulate``, ``sweep``, ``search``, ``validate``) reads this form, so a
composed policy can be swept, searched and validated like a preset. The string is a preset name followed by
``+PART=VALUE`` items; each part replaces one part of the preset and is checked against its own registry.
``simulate``'s part flags (``--eviction``, ``--scope``, ...) build the same :class:`PolicySpec`.

The canonical name (:func:`canonical_name`) lists the parts in sorted order and leaves out a part that
changes nothing (``lru+eviction=lru`` is ``lru``), so one policy has one name in sweep tables, journals and
the cost model's results however it was typed, and a plain preset keeps its own name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional, Sequence

from moesim.errors import MoesimError
from moesim.simulator.cache import CACHE_POLICIES, SCOPES
from moesim.simulator.config import PolicySpec
from moesim.simulator.gating import GatingSpec
from moesim.simulator.placement import PLACEMENTS, RULES, PlacementSpec
from moesim.simulator.prefetch import PREFETCHERS
from moesim.simulator.presets import PRESETS, get_preset
from moesim.simulator.transfer import TRANSFERS, transfer_spec


@dataclass(frozen=True)
class Part:
    """One replaceable part of a policy: its accepted values (for the error) and how it changes a spec."""

    name: str
    choices: Callable[[], Sequence[str]]
    apply: Callable[[PolicySpec, str], PolicySpec]
    normalise: Callable[[str], str] = str
    family: str = ""  # the registry's word for it ("prefetcher"), in the error of a flag like --prefetch

    def flag_prefix(self, value: str) -> str:
        """How the error for ``--PART VALUE`` starts."""
        return f"--{self.name} {self.family} '{value}'" if self.family else f"--{self.name} '{value}'"


def _eviction(policy: PolicySpec, value: str) -> PolicySpec:
    initial = "popular" if value == "static" else policy.cache.initial
    return policy.with_parts(cache=replace(policy.cache, policy=value, initial=initial))


def _scope(policy: PolicySpec, value: str) -> PolicySpec:
    return policy.with_parts(cache=replace(policy.cache, scope=value))


def _prefetch(policy: PolicySpec, value: str) -> PolicySpec:
    return policy.with_parts(prefetch=replace(policy.prefetch, policy=value))


def _guess(policy: PolicySpec, value: str) -> PolicySpec:
    return policy.with_parts(prefetch=replace(policy.prefetch, guess=value))


def _placement(policy: PolicySpec, value: str) -> PolicySpec:
    return policy.with_parts(placement=PlacementSpec(value, policy.placement.rule))


def _placement_rule(policy: PolicySpec, value: str) -> PolicySpec:
    return policy.with_parts(placement=PlacementSpec(policy.placement.policy, value))


def _transfer(policy: PolicySpec, value: str) -> PolicySpec:
    tr = policy.transfer
    return policy.with_parts(transfer=transfer_spec(value, staging_experts=tr.staging_experts,
                                                    prefetch_buffer_experts=tr.prefetch_buffer_experts,
                                                    demand_priority=tr.demand_priority))


GATING_CHOICES = ("off", "adapmoe", "a uniform threshold between 0 and 1")


def gating_spec(value: str) -> GatingSpec:
    if value in ("off", "adapmoe"):
        return GatingSpec(value)
    try:
        threshold = float(value)
    except ValueError:
        raise MoesimError(f"expected one of {', '.join(GATING_CHOICES)}") from None
    return GatingSpec("uniform", threshold)


def _gating(policy: PolicySpec, value: str) -> PolicySpec:
    return policy.with_parts(gating=gating_spec(value))


def _gating_text(value: str) -> str:
    try:
        return repr(float(value))  # 0.10 and 0.1 are one policy
    except ValueError:
        return value


# The parts in the order ``simulate``'s flags list them; the part name is the flag without its dashes.
PARTS: dict[str, Part] = {p.name: p for p in (
    Part("eviction", CACHE_POLICIES.names, _eviction, family=CACHE_POLICIES.family),
    Part("scope", lambda: SCOPES, _scope),
    Part("prefetch", PREFETCHERS.names, _prefetch, family=PREFETCHERS.family),
    Part("guess", lambda: ("auto", "trace", "previous-token", "accuracy:P"), _guess),
    Part("placement", PLACEMENTS.names, _placement, family=PLACEMENTS.family),
    Part("placement-rule", lambda: RULES, _placement_rule),
    Part("transfer", TRANSFERS.names, _transfer, family=TRANSFERS.family),
    Part("gating", lambda: GATING_CHOICES, _gating, _gating_text),
)}
# Parts whose value is free-form (checked by parsing it) rather than one of a fixed list of names.
_PARSED_PARTS = ("guess", "gating")


@dataclass(frozen=True)
class PolicyName:
    """A parsed policy string: the preset and its replaced parts, sorted by part name."""

    preset: str
    parts: tuple[tuple[str, str], ...] = ()

    def text(self) -> str:
        return "+".join([self.preset] + [f"{k}={v}" for k, v in self.parts])


def _where(text: str, flag: str) -> str:
    return f"{flag} '{text}'" if flag else f"policy '{text}'"


def parse_policy_name(text: str, flag: str = "--policy") -> PolicyName:
    """Split ``PRESET+PART=VALUE+...`` and check each name (the values are checked by :func:`compose`)."""
    items = [t.strip() for t in str(text).split("+")]
    preset, items = items[0], items[1:]
    if not preset:
        raise MoesimError(f"{_where(text, flag)}: expected a preset name first, e.g. lru+prefetch=oracle")
    if preset not in PRESETS and not items:
        PRESETS.get(preset, flag)  # the registry's own error: "--policy policy 'x': expected one of ..."
    if preset not in PRESETS:
        raise MoesimError(f"{_where(text, flag)}: preset '{preset}': expected one of {', '.join(PRESETS.names())}")
    parts: dict[str, str] = {}
    for item in items:
        name, sep, value = (s.strip() for s in item.partition("="))
        if name not in PARTS or not sep or not value:
            raise MoesimError(f"{_where(text, flag)}: '{item}': expected PART=VALUE with PART one of "
                              f"{', '.join(PARTS)}")
        if name in parts:
            raise MoesimError(f"{_where(text, flag)}: part {name} given twice")
        parts[name] = PARTS[name].normalise(value)
    return PolicyName(preset, tuple(sorted(parts.items())))


def _apply(policy: PolicySpec, part: str, value: str, prefix: str) -> PolicySpec:
    """``policy`` with ``part`` replaced; a bad value is an error starting with ``prefix`` (the flag or string)."""
    spec = PARTS[part]
    if part not in _PARSED_PARTS and value not in spec.choices():
        raise MoesimError(f"{prefix}: expected one of {', '.join(spec.choices())}")
    try:
        return spec.apply(policy, value)
    except MoesimError as exc:
        message = exc.message
        if message.startswith(f"--{part} "):  # the part's own check names its flag; the prefix already does
            message = message.partition(": ")[2]
        raise MoesimError(f"{prefix}: {message}") from None


def compose(preset: str, parts: Mapping[str, Optional[str]], predictor_train: tuple[str, ...] = (),
            flag: str = "--policy", text: Optional[str] = None) -> PolicySpec:
    """``preset`` with ``parts`` (part name -> value; None keeps the preset's) replaced, named canonically."""
    given = {k: PARTS[k].normalise(str(v).strip()) for k, v in parts.items() if v is not None}
    unknown = sorted(set(given) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown policy parts {unknown}")  # a programming error, not a user one
    where = _where(text if text is not None else PolicyName(preset, tuple(sorted(given.items()))).text(), flag)
    base = get_preset(preset)
    policy = base
    kept = []
    for part in PARTS:  # the fixed order keeps interacting parts (placement, placement-rule) deterministic
        if part in given:
            prefix = f"{where}: {part} '{given[part]}'"
            policy = _apply(policy, part, given[part], prefix)
            if _apply(base, part, given[part], prefix) != base:
                kept.append((part, given[part]))
    if predictor_train:
        policy = policy.with_parts(prefetch=replace(policy.prefetch, train=tuple(predictor_train)))
    return replace(policy, name=PolicyName(preset, tuple(sorted(kept))).text())


def policy_spec(text: str, flag: str = "--policy") -> PolicySpec:
    """The :class:`PolicySpec` a policy string names (a preset, or a preset with parts replaced)."""
    name = parse_policy_name(text, flag)
    return compose(name.preset, dict(name.parts), flag=flag, text=str(text))


def canonical_name(text: str, flag: str = "--policy") -> str:
    """The one name of the policy ``text`` names: sorted parts, no part that changes nothing."""
    return policy_spec(text, flag).name


def policy_names(texts: Sequence[str], flag: str = "--policy") -> list[str]:
    """Canonical names of a list of policy strings, each checked, duplicates after canonicalisation removed."""
    return list(dict.fromkeys(canonical_name(t, flag) for t in texts))


def build_policy(name: str, eviction: Optional[str] = None, scope: Optional[str] = None,
                 prefetch: Optional[str] = None, placement: Optional[str] = None, placement_rule: Optional[str] = None,
                 transfer: Optional[str] = None, gating: Optional[str] = None,
                 predictor_train: tuple[str, ...] = (), guess: Optional[str] = None) -> PolicySpec:
    """``simulate``'s form: a policy string and part flags (a flag may not repeat a part the string gives)."""
    parsed = parse_policy_name(name)
    flags = {"eviction": eviction, "scope": scope, "prefetch": prefetch, "guess": guess, "placement": placement,
             "placement-rule": placement_rule, "transfer": transfer, "gating": gating}
    parts = dict(parsed.parts)
    for part, value in flags.items():
        if value is None:
            continue
        if part in parts:
            raise MoesimError(f"--{part} {value} and --policy '{name}' both set {part}: expected one")
        _apply(get_preset(parsed.preset), part, PARTS[part].normalise(str(value).strip()),
               PARTS[part].flag_prefix(value))
        parts[part] = value
    return compose(parsed.preset, parts, tuple(predictor_train), flag="--policy")


def reads_the_future(policy: PolicySpec) -> bool:
    """An oracle (Belady's eviction, the oracle prefetcher): a bound to compare against, not a deployable policy."""
    return policy.cache.policy == "belady" or policy.prefetch.policy == "oracle"
