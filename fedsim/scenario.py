"""Scenario files: schema (pydantic v2), TOML loading, ``--set`` overrides, JSON Schema.

A scenario is one TOML file with the tables ``run``, ``data``, ``model``, ``client``,
``strategy``, ``simulation``, ``churn``, ``system``, ``coordinator``, ``attack``,
``privacy``, ``deployment`` and the list ``transforms``. Every key has a
default except what must be chosen (e.g. ``data.path`` for MNIST); unknown keys are
errors; every error names its key path.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import Field, ValidationError

import fedsim.variants as variants
import fedsim.world.availability  # noqa: F401  (registers the built-in availability models)
from fedsim.attack_params import ATTACKS, AttackParams
from fedsim.client_params import CLIENTS, ClientParams
from fedsim.data import DATASETS
from fedsim.deploy.config import DeploymentSection, check_deployment
from fedsim.errors import ScenarioError
from fedsim.models import MODELS, ModelSpec
from fedsim.plugins import load_builtins, load_plugins
from fedsim.privacy.config import PrivacySection, check_privacy
from fedsim.registry import Registry, Variants
from fedsim.sections import Section
from fedsim.strategy_params import STRATEGIES, StrategyParams
from fedsim.transforms import TRANSFORMS, AggregateTransform, Chains, UpdateTransform
from fedsim.world.config import ChurnSection, CoordinatorSection, SystemSection


class RunSection(Section):
    name: str = Field(
        "fedsim",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name; the default output folder is runs/<name>-<UTC timestamp>.",
    )
    seed: int = Field(
        0,
        ge=0,
        lt=2**63,
        description="Root seed: partitioning, sampling, initialisation and batching derive from it.",
    )
    rounds: int = Field(10, ge=1, description="Number of federated rounds.")
    plugins: list[str] = Field(
        default_factory=list,
        description="Plug-ins whose registrations (strategies, models, datasets, partitioners, "
        "client behaviours, availability models) this scenario can name: module names, or "
        ".py files relative to the working directory. Imported before the rest of the "
        "scenario is validated, in the driver and in every worker.",
    )
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        description="Write a checkpoint every N rounds (model, strategy state, virtual "
        "clock, world and client states, metrics so far) into the run folder, so "
        "`fedsim run --resume DIR` continues a run that stopped (crash, kill -9, power "
        "loss) exactly as if it had not; omit for no checkpoints.",
    )
    target_accuracy: float | None = Field(
        None,
        gt=0,
        le=1,
        description="If set, summary.json reports the virtual time (and round) at which test "
        "accuracy first reached it (centralized, else client-side); null if never.",
    )


class ClientResources(Section):
    cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per concurrently running client.")
    gpus: float = Field(
        0.0,
        ge=0,
        description="Ray GPUs per client; fractional values share a GPU (0.25 = four per GPU).",
    )


class SimulationSection(Section):
    engine: Literal["fedsim", "flower", "deployment"] = Field(
        "fedsim",
        description="'fedsim': fedsim's Grid over a Ray actor pool (fast). "
        "'flower': the same apps under Flower's run_simulation (the reference). "
        "'deployment': a real Flower SuperLink with the clients on real SuperNodes "
        "(`fedsim node`) over gRPC, as the [deployment] table says.",
    )
    num_workers: int | None = Field(
        None,
        ge=1,
        description="Ray actors hosting clients (fedsim engine); default: as many as "
        "client_resources fit on the Ray cluster.",
    )
    client_resources: ClientResources = Field(default_factory=ClientResources)
    ray_address: str | None = Field(
        None,
        description="Address of an existing Ray cluster (e.g. '127.0.0.1:6379'); "
        "default: start a private local Ray bound to 127.0.0.1.",
    )
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per client worker.")


def _default(registry: Registry[Any]) -> Any:
    """The registry's default entry with its defaults (built-ins loaded first)."""
    load_builtins()
    return registry.default_params()


class Scenario(Section):
    run: RunSection = Field(default_factory=RunSection)
    data: Annotated[Section, Variants(DATASETS)] = Field(default_factory=lambda: _default(DATASETS))
    model: ModelSpec = Field(default_factory=lambda: _default(MODELS))
    client: Annotated[ClientParams, Variants(CLIENTS)] = Field(
        default_factory=lambda: _default(CLIENTS)
    )
    strategy: Annotated[StrategyParams, Variants(STRATEGIES)] = Field(
        default_factory=lambda: _default(STRATEGIES)
    )
    simulation: SimulationSection = Field(default_factory=SimulationSection)
    churn: ChurnSection = Field(default_factory=ChurnSection)
    system: SystemSection = Field(default_factory=SystemSection)
    coordinator: CoordinatorSection = Field(default_factory=CoordinatorSection)
    transforms: list[Annotated[Section, Variants(TRANSFORMS)]] = Field(
        default_factory=list,
        description="Transforms of the clients' updates w - w_t, in order: per-update ones "
        "(clip, reject) in the worker before folding, aggregate ones on the mean update "
        "at the coordinator. Each is a table with a 'kind' key.",
    )
    attack: Annotated[AttackParams, Variants(ATTACKS)] = Field(
        default_factory=lambda: _default(ATTACKS)
    )
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    deployment: DeploymentSection = Field(default_factory=DeploymentSection)

    # Derived sizes the engine needs everywhere.
    @property
    def num_clients(self) -> int:
        return self.data.num_clients

    def chains(self, noise_multiplier: float | None = None) -> Chains:
        """The transforms the engine runs on updates: the scenario's own, then the DP
        mechanism's (clipping last among the per-update ones, so it bounds what is
        folded; noise on the mean). ``noise_multiplier``: a calibrated z, where the
        scenario leaves it to privacy.target_epsilon."""
        from fedsim.privacy.mechanisms import mechanism_transforms

        extra = mechanism_transforms(self, noise_multiplier)
        return Chains.of([*self.transforms, *extra], seed=self.run.seed, equal_weights=bool(extra))

    @property
    def expected_cohort(self) -> int:
        """The clients a training round expects (DP's fixed denominator m): K, also
        under Poisson sampling, where it is q N."""
        return min(self.train_cohort, self.num_clients)

    @property
    def train_cohort(self) -> int:
        k = self.strategy.clients_per_round
        return self.num_clients if k is None else k

    @property
    def eval_cohort(self) -> int:
        if self.strategy.evaluate_trained_clients:
            return self.train_cohort
        e = self.strategy.evaluate_clients_per_round
        return self.train_cohort if e is None else e

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


# --------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=VALUE"`` -> (["a","b","c"], value); VALUE parsed as a TOML value.

    A value that is not valid TOML is taken as a bare string, so
    ``--set data.path=../shared/data/mnist`` needs no quoting.
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ScenarioError([("--set", f"expected KEY=VALUE, got {item!r}")])
    parts = key.split(".")
    if any(not p for p in parts):
        raise ScenarioError([("--set", f"bad key path {key!r}")])
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` items. Switching a variant (``--set strategy.name=fedavg``) drops
    the file's keys the new variant does not take (e.g. ``proximal_mu``), so one file can
    serve as several arms of an experiment; keys set on the command line are kept."""
    switched: dict[tuple[str, ...], Any] = {}
    set_keys: set[tuple[str, ...]] = set()
    _load_plugins_of(raw)  # a variant the file names may come from one of its plug-ins
    for item in overrides:
        parts, value = parse_override(item)
        cur = raw
        for i, p in enumerate(parts[:-1]):
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise ScenarioError([(where, f"is not a table, cannot set {'.'.join(parts)}")])
            cur = nxt
        table = tuple(parts[:-1])
        reg = variants.table_registry(Scenario, table, raw)
        if reg is not None and parts[-1] == reg.key and cur.get(parts[-1], value) != value:
            switched[table] = value
        cur[parts[-1]] = value
        set_keys.add(tuple(parts))
    if switched:  # the new variant may come from a plug-in
        _load_plugins_of(raw)
    for table, value in switched.items():
        fields = variants.variant_fields(Scenario, table, value, raw)
        cur = raw
        for p in table:
            cur = cur[p]
        if fields is not None:
            for key in [k for k in cur if k not in fields and (*table, k) not in set_keys]:
                del cur[key]
    _one_budget(raw, set_keys)
    return raw


_TARGET, _Z = ("privacy", "target_epsilon"), ("privacy", "dp", "noise_multiplier")


def _one_budget(raw: dict[str, Any], set_keys: set[tuple[str, ...]]) -> None:
    """``privacy.target_epsilon`` and a fixed ``privacy.dp.noise_multiplier`` exclude each
    other (unless ``privacy.stop_at_budget``): the one set on the command line replaces
    the file's other, so ``--set privacy.target_epsilon=8`` calibrates the noise of a
    file that fixes it (and ``--set privacy.dp.noise_multiplier=2`` fixes the noise of a
    file that calibrates it). Both set on the command line stay, and are refused."""
    privacy = raw.get("privacy")
    dp = privacy.get("dp") if isinstance(privacy, dict) else None
    if not isinstance(dp, dict) or privacy.get("stop_at_budget") is True:  # type: ignore[union-attr]
        return
    if _TARGET in set_keys and _Z not in set_keys:
        dp.pop("noise_multiplier", None)
    elif _Z in set_keys and _TARGET not in set_keys:
        privacy.pop("target_epsilon", None)  # type: ignore[union-attr]


def _key_path(loc: tuple[Any, ...], raw: Any) -> str:
    """Turn a pydantic error location into a scenario key path, dropping union tags."""
    parts: list[str] = []
    cur = raw
    tag_keys = {reg.key for reg in variants.registries(Scenario)}
    for el in loc:
        if isinstance(cur, dict) and el in cur:
            parts.append(str(el))
            cur = cur[el]
        elif isinstance(cur, list) and isinstance(el, int) and 0 <= el < len(cur):
            parts[-1] = f"{parts[-1]}[{el}]" if parts else f"[{el}]"
            cur = cur[el]
        elif isinstance(cur, dict) and any(cur.get(k) == el for k in tag_keys):
            continue  # the discriminated-union tag pydantic inserts
        else:
            parts.append(str(el))
            cur = None
    return ".".join(parts)


def _num(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _message(err: dict[str, Any]) -> str:
    t, ctx = err["type"], err.get("ctx", {})
    simple = {
        "greater_than": "must be > {gt}",
        "greater_than_equal": "must be >= {ge}",
        "less_than": "must be < {lt}",
        "less_than_equal": "must be <= {le}",
        "missing": "is required",
        "extra_forbidden": "unknown key",
        "int_parsing": "must be an integer",
        "int_type": "must be an integer",
        "int_from_float": "must be an integer",
        "float_parsing": "must be a number",
        "float_type": "must be a number",
        "bool_parsing": "must be true or false",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
        "list_type": "must be an array",
        "model_type": "must be a table",
        "dict_type": "must be a table",
        "string_pattern_mismatch": "must match {pattern}",
        "finite_number": "must be a finite number (not inf or nan)",
    }
    if t in simple:
        try:
            return simple[t].format(**{k: _num(v) for k, v in ctx.items()})
        except (KeyError, IndexError):
            return simple[t]
    if t == "literal_error":
        return f"must be one of {ctx.get('expected', '')} (got {err.get('input')!r})"
    if t == "union_tag_invalid":
        return f"unknown value {ctx.get('tag')!r}; known: {ctx.get('expected_tags')}"
    if t == "union_tag_not_found":
        return f"missing key {ctx.get('discriminator')}"
    msg = str(err.get("msg", t))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    # "Input should be ..." -> "input should be ..."; keep acronyms such as "MNIST".
    return msg[:1].lower() + msg[1:] if msg[1:2].islower() else msg


def _problems(exc: ValidationError, raw: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        path = _key_path(tuple(err["loc"]), raw)
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            tag = err.get("ctx", {}).get("discriminator", "").strip("'")
            path = f"{path}.{tag}" if tag else path
        out.append((path, _message(err)))
    return out


def cross_check(scn: Scenario) -> list[tuple[str, str]]:
    """Impossible combinations that span tables."""
    problems: list[tuple[str, str]] = []
    n = scn.num_clients
    s = scn.strategy
    if s.clients_per_round is not None and s.clients_per_round > n:
        problems.append(
            ("strategy.clients_per_round", f"{s.clients_per_round} > data.num_clients ({n})")
        )
    e = s.evaluate_clients_per_round
    if e is not None and e > n:
        problems.append(("strategy.evaluate_clients_per_round", f"{e} > data.num_clients ({n})"))
    if s.evaluate_trained_clients and e is not None:
        problems.append(
            (
                "strategy.evaluate_clients_per_round",
                "not used with evaluate_trained_clients = true (the trained clients evaluate)",
            )
        )
    problems += s.check(cohort_size=min(scn.train_cohort, n))
    if s.name == "fedprox" and scn.client.mu > 0:
        problems.append(
            ("client.mu", "set the proximal term once: strategy.proximal_mu (fedprox) or client.mu")
        )
    gpus = scn.simulation.client_resources.gpus
    if gpus > 1 and gpus != int(gpus):
        problems.append(
            ("simulation.client_resources.gpus", "must be a fraction <= 1 or a whole number")
        )
    problems += _check_world(scn)
    a = scn.attack
    if not a.active and (a.fraction or a.count):
        problems.append(("attack.kind", "attackers are set ('fraction' or 'count'): name a kind"))
    if a.count is not None and a.fraction:
        problems.append(("attack.count", "set 'count' or 'fraction', not both"))
    if a.count is not None and a.count > n:
        problems.append(("attack.count", f"{a.count} > data.num_clients ({n})"))
    for i, t in enumerate(scn.transforms):
        if not isinstance(t, UpdateTransform | AggregateTransform):
            problems.append(
                (
                    f"transforms[{i}]",
                    f"'{t.kind}' is neither an UpdateTransform nor an AggregateTransform",
                )
            )
    if scn.privacy.dp.mode == "sample" and (s.name == "fedprox" or scn.client.mu > 0):
        problems.append(
            (
                "strategy.name" if s.name == "fedprox" else "client.mu",
                "fedsim's DP-SGD (privacy.dp.mode = 'sample') has no proximal term yet: "
                "FedProx's mu would be ignored",
            )
        )
    if scn.privacy.dp.mode == "sample" and not type(scn.client).dp_sgd:
        problems.append(
            (
                "client.behaviour",
                f"'{scn.client.behaviour}' does not train with DP-SGD, which "
                "privacy.dp.mode = 'sample' needs (use 'sgd')",
            )
        )
    engine = scn.simulation.engine
    if scn.run.checkpoint_every is not None and engine != "fedsim" and type(scn.client).keeps_state:
        where = "Flower's runtime" if engine == "flower" else "each SuperNode"
        problems.append(
            (
                "run.checkpoint_every",
                f"client behaviour '{scn.client.behaviour}' may keep client state, which "
                f"{where} holds where no checkpoint can save it: use "
                "simulation.engine = 'fedsim'",
            )
        )
    if engine == "deployment":
        problems += check_deployment(scn.deployment)
        if scn.deployment.client_data == "local":
            if scn.coordinator.max_examples is None:
                problems.append(
                    (
                        "coordinator.max_examples",
                        "required with deployment.client_data = 'local': the coordinator "
                        "cannot know how many examples a node's own folder holds, so this "
                        "caps what a node may claim",
                    )
                )
            if scn.privacy.dp.mode == "sample":
                problems.append(
                    (
                        "privacy.dp.mode",
                        "'sample' (DP-SGD) accounts each client from its shard size, which "
                        "the coordinator does not know with deployment.client_data = 'local'",
                    )
                )
        if scn.simulation.ray_address is not None:
            problems.append(("simulation.ray_address", "not used by engine 'deployment'"))
    # (With another engine a [deployment] table is ignored: the file that is deployed
    # can be simulated unchanged, `--set simulation.engine=fedsim`.)
    problems += check_privacy(
        scn.privacy,
        num_clients=n,
        weighted_mean=type(s).weighted_mean,
        strategy=s.name,
        mean_strategies=[x for x in STRATEGIES.names() if STRATEGIES.params(x).weighted_mean],
        expected_cohort=scn.expected_cohort,
    )
    problems += _check_sampling(scn)
    if engine != "fedsim" and scn.simulation.num_workers is not None:
        problems.append(
            (
                "simulation.num_workers",
                f"not used by engine '{engine}' (only fedsim's own pool has workers)",
            )
        )
    return problems


def _check_sampling(scn: Scenario) -> list[tuple[str, str]]:
    """What the accountant can account for the sampling the coordinator does."""
    p, co = scn.privacy, scn.coordinator
    if not p.active or p.dp.per_client:  # (per-client accounting uses no sampling event)
        return []
    problems: list[tuple[str, str]] = []
    if p.assume_sampling is not None and p.assume_sampling != co.sampling:
        problems.append(
            (
                "privacy.assume_sampling",
                f"'{p.assume_sampling}' but coordinator.sampling = '{co.sampling}': only the "
                "sampling that is done can be assumed",
            )
        )
    amplified = not scn.churn.active or p.assume_sampling is not None
    if p.accountant == "pld" and co.sampling == "fixed" and amplified:
        problems.append(
            (
                "privacy.accountant",
                "'pld' has no event for fixed-size sampling (without replacement): use "
                "coordinator.sampling = 'poisson' or privacy.accountant = 'rdp'",
            )
        )
    return problems


#: The most times a waiting coordinator may look again for online clients in a round.
MAX_WAIT_CHECKS = 100_000


def _check_world(scn: Scenario) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    co, ch = scn.coordinator, scn.churn
    k = min(scn.train_cohort, scn.num_clients)
    if co.min_replies > k:
        problems.append(("coordinator.min_replies", f"{co.min_replies} > clients per round ({k})"))
    if co.max_wait_s / co.wait_step_s > MAX_WAIT_CHECKS:
        problems.append(
            (
                "coordinator.wait_step_s",
                f"max_wait_s / wait_step_s = {co.max_wait_s / co.wait_step_s:.3g} checks of "
                f"who is online per round: at most {MAX_WAIT_CHECKS:,}",
            )
        )
    if co.sampling == "poisson" and co.over_commit > 1:
        problems.append(
            (
                "coordinator.over_commit",
                "not used with coordinator.sampling = 'poisson' (a Poisson cohort is "
                "aggregated whole; raise strategy.clients_per_round for more clients)",
            )
        )
    if co.straggler_policy == "partial" and co.deadline_s is None:
        problems.append(("coordinator.straggler_policy", "'partial' needs coordinator.deadline_s"))
    if scn.simulation.engine != "fedsim":
        # Flower's runtime and a deployment have no virtual clock: only what a failing
        # ClientApp can express (a deployment's churn is real).
        which = "Flower's runtime" if scn.simulation.engine == "flower" else "a deployment"
        why = f"needs simulation.engine = 'fedsim' ({which} has no virtual clock)"
        if ch.availability.kind != "always":
            problems.append(("churn.availability.kind", f"'{ch.availability.kind}' {why}"))
        m = ch.membership
        if m.initial_fraction < 1 or m.mean_lifetime_s is not None or m.schedule is not None:
            problems.append(("churn.membership", f"joins and leaves {why}"))
        if scn.system != SystemSection():
            problems.append(("system", f"device heterogeneity {why}"))
        for key in ("over_commit", "deadline_s", "min_round_s"):
            if getattr(co, key) != CoordinatorSection.model_fields[key].default:
                problems.append((f"coordinator.{key}", why))
    return problems


_built_generation = -1


def refresh_schema() -> None:
    """Rebuild the scenario's models once registrations have changed (built-ins loaded
    for the first time, a plug-in imported)."""
    global _built_generation
    load_builtins()
    if _built_generation != Registry.generation:
        variants.rebuild(Scenario)
        _built_generation = Registry.generation


def _load_plugins_of(raw: dict[str, Any]) -> None:
    """Import the plug-ins ``run.plugins`` names (a malformed list is left to validation)
    and bring the schema up to date with their registrations."""
    run = raw.get("run")
    plugins = run.get("plugins") if isinstance(run, dict) else None
    if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):
        load_plugins(plugins)
    refresh_schema()


def scenario_from_dict(raw: dict[str, Any]) -> Scenario:
    _load_plugins_of(raw)
    variants.fill_selectors(raw, Scenario)
    try:
        scn = Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(_problems(exc, raw)) from None
    problems = cross_check(scn)
    if problems:
        raise ScenarioError(problems)
    return scn


def scenario_from_json(spec_json: str) -> Scenario:
    """A resolved scenario as sent to workers (``Scenario.model_dump_json()``): its
    plug-ins are imported in this process first."""
    raw = json.loads(spec_json)
    _load_plugins_of(raw)
    return Scenario.model_validate(raw)


#: A scenario file larger than this is refused before it is read (scenarios are a few KB).
MAX_SCENARIO_BYTES = 1 << 20


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML tables of a scenario file. ScenarioError for a missing, unreadable,
    oversized, non-UTF-8, malformed or empty file (a file that asks for every default
    says so with at least one table, e.g. ``[run]``)."""
    try:
        if path.stat().st_size > MAX_SCENARIO_BYTES:
            raise ScenarioError(
                [("", f"larger than {MAX_SCENARIO_BYTES >> 20} MiB: not a scenario")]
            )
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ScenarioError([("", "no such file")]) from None
    except IsADirectoryError:
        raise ScenarioError([("", "is a folder, not a scenario file")]) from None
    except OSError as exc:
        raise ScenarioError([("", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ScenarioError([("", f"not UTF-8 text (byte {exc.start}): {exc.reason}")]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError([("", f"TOML syntax error: {exc}")]) from None
    except RecursionError:
        raise ScenarioError([("", "TOML syntax error: nested too deeply")]) from None
    if not raw:
        raise ScenarioError(
            [
                (
                    "",
                    "empty scenario: name at least one table (an empty [run] table asks "
                    "for every default)",
                )
            ]
        )
    return raw


def load_scenario(path: str | Path | None, overrides: list[str] | None = None) -> Scenario:
    """Load, override and validate a scenario; raises ScenarioError naming each key path."""
    raw = read_toml(Path(path) if path is not None else default_scenario_path())
    return scenario_from_dict(apply_overrides(raw, list(overrides or [])))


def default_scenario_path() -> Path:
    """The embedded default: scenarios/quickstart.toml (shipped as fedsim.scenarios)."""
    from importlib import resources

    return Path(str(resources.files("fedsim.scenarios") / "quickstart.toml"))


def json_schema() -> dict[str, Any]:
    refresh_schema()
    schema = Scenario.model_json_schema()
    schema["title"] = "fedsim scenario"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
