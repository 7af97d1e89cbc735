"""The registry: spec strings to components, for the CLI, tasks, flows, preflight and stage runners.

The grammar, in one place:
- LLM: 'local' (the default subject), 'local:MODEL' (a folder, .gguf file or hub name),
  'openai:MODEL' (api.openai.com, needs $OPENAI_API_KEY) or 'openai:MODEL@http://host:port/v1'
  (any OpenAI-compatible server);
- explainer: 'embedding' (offline default), 'with-outputs[:LLM]' (the LLM explainer told also what
  each unit writes) or an LLM spec (the LLM explainer over that LLM);
- simulator: 'KIND' or 'KIND:LLM', where KIND is a registered simulator's `kind` and its class's
  `takes_llm` says whether the LLM is "none", "optional" (default 'local') or "required";
  'KIND/N:LLM' puts N records of one explanation in each request, for a simulator that can
  (`records_per_request`; default 1, one record per prompt as in the paper);
- scorer: the same grammar over the registered scorers ('simulation', the default);
- unit source: a registered `sources.UnitSource`'s kind ('mlp', the default).

`parse_*` check a spec and load nothing; `make_*` build the component. A component's identity
(`simulator_identity`) comes from its class-level data (`components.Component`), so nothing is
loaded to learn it.

Adding a simulator: write its module (a `components.Simulator` subclass with `kind` and
`simulate`), and add its class to `_simulator_classes` below: one line. Code outside the package
calls `register_simulator(cls)` instead. A scorer (`components.Scorer`, `_scorer_classes`,
`register_scorer`) and a unit source (`sources.UnitSource`, `_source_classes`, `register_source`)
are added the same way.

The built-in classes are imported inside the functions that use them: parsing a simulator spec
then imports no explainer, and the code identity of a stage (`identity`) reaches only the
components of its own role.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from autoexplain.errors import UserError
from autoexplain.llm import KEY_ENV

DEFAULT_LLM = "local"
DEFAULT_EXPLAINER = "embedding"
DEFAULT_SIMULATOR = "embedding"
DEFAULT_SCORER = "simulation"
DEFAULT_SOURCE = "mlp"
LLM_USAGE = "use 'local', 'local:MODEL', 'openai:MODEL' or 'openai:MODEL@http://host:port/v1'"

_REGISTERED: dict[str, dict[str, type]] = {"simulator": {}, "explainer": {}, "scorer": {}, "source": {}}


def _simulator_classes() -> dict[str, type]:
    from autoexplain.embedding import EmbeddingSimulator
    from autoexplain.simulate import AllAtOnceSimulator
    from autoexplain.simulate_chat import ChatJsonSimulator

    builtin = [EmbeddingSimulator, AllAtOnceSimulator, ChatJsonSimulator]
    return {**{cls.kind: cls for cls in builtin}, **_REGISTERED["simulator"]}


def _explainer_classes() -> dict[str, type]:
    from autoexplain.explain import OutputsExplainer
    from autoexplain.explain_embedding import EmbeddingExplainer

    builtin = [EmbeddingExplainer, OutputsExplainer]
    return {**{cls.kind: cls for cls in builtin}, **_REGISTERED["explainer"]}


def _scorer_classes() -> dict[str, type]:
    from autoexplain.classify import ActiveFuzzingScorer, DetectionScorer, FuzzingScorer, IntruderScorer
    from autoexplain.score_embedding import EmbeddingScorer
    from autoexplain.score_simulation import SimulationScorer

    builtin = [SimulationScorer, DetectionScorer, FuzzingScorer, ActiveFuzzingScorer, IntruderScorer, EmbeddingScorer]
    return {**{cls.kind: cls for cls in builtin}, **_REGISTERED["scorer"]}


def _source_classes() -> dict[str, type]:
    from autoexplain.sources import MlpSource

    builtin = [MlpSource]
    return {**{cls.kind: cls for cls in builtin}, **_REGISTERED["source"]}


def _register(role: str, cls: type, base: type) -> type:
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"a {role} must subclass {base.__module__}.{base.__name__}, not {cls!r}")
    if not cls.kind or ":" in cls.kind:
        raise ValueError(f"{cls.__name__}.kind must be a non-empty name without ':', got {cls.kind!r}")
    from autoexplain.components import Component

    if issubclass(cls, Component) and cls.takes_llm not in ("none", "optional", "required"):
        raise ValueError(f"{cls.__name__}.takes_llm must be 'none', 'optional' or 'required'")
    _REGISTERED[role][cls.kind] = cls
    return cls


def register_simulator(cls: type) -> type:
    """Make a `components.Simulator` subclass known by its `kind` (usable as a decorator). A kind
    registered again replaces the earlier class, built-ins included."""
    from autoexplain.components import Simulator

    return _register("simulator", cls, Simulator)


def register_explainer(cls: type) -> type:
    """Make a `components.Explainer` subclass known by its `kind` (usable as a decorator)."""
    from autoexplain.components import Explainer

    return _register("explainer", cls, Explainer)


def register_scorer(cls: type) -> type:
    """Make a `components.Scorer` subclass known by its `kind` (usable as a decorator)."""
    from autoexplain.components import Scorer

    return _register("scorer", cls, Scorer)


def register_source(cls: type) -> type:
    """Make a `sources.UnitSource` subclass known by its `kind` (usable as a decorator)."""
    from autoexplain.sources import UnitSource

    return _register("source", cls, UnitSource)


def unregister(kind: str) -> None:
    """Forget a class registered with `register_*` (the built-ins come back)."""
    for table in _REGISTERED.values():
        table.pop(kind, None)


# ---- LLMs ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LLMSpec:
    kind: str  # 'local' or 'openai'
    model: str | None  # None: the default subject ('local' alone)
    url: str | None  # an OpenAI-compatible server; None: api.openai.com (or the caller's base_url)
    key_env: str = KEY_ENV  # the environment variable that holds its API key


def parse_llm(spec: str | None) -> LLMSpec:
    """'local', 'local:MODEL', 'openai:MODEL' or 'openai:MODEL@URL', the last two with '#VAR' after
    them when the key is in $VAR, not $OPENAI_API_KEY: an explainer at OpenAI and a simulator on
    another provider each get their own key, and neither is sent to the other's server."""
    spec = (spec or DEFAULT_LLM).strip()
    kind, _, rest = spec.partition(":")
    if kind == "local":
        return LLMSpec("local", rest or None, None)
    if kind != "openai":
        raise UserError(f"unknown LLM '{spec}'", LLM_USAGE)
    key_env = KEY_ENV
    if "#" in rest:  # a model name or URL holds none (a URL's fragment is never sent)
        rest, _, key_env = rest.rpartition("#")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
            raise UserError(f"'{spec}': '#{key_env}' is no environment variable's name",
                            "write the variable that holds the server's API key after '#', e.g. '#TOGETHER_API_KEY'")
    at = rest.rfind("@http")
    model, url = (rest[:at], rest[at + 1:]) if at >= 0 else (rest, None)
    name, at_sign, host = rest.rpartition("@")
    if url is None and at_sign and not host.isdigit():
        # Without its scheme the address would be read as part of the model's name and sent to
        # OpenAI. Only a version tag of digits is taken as the name's ('text-bison@002' on Vertex).
        if not host:
            raise UserError(f"'{spec}': no server address follows '@'", f"write 'openai:{name}@http://HOST:PORT/v1', or leave '@' out")
        raise UserError(f"'{spec}': the server address after '@' has no http:// or https://",
                        f"write 'openai:{name}@http://{host}'")
    if not model:
        raise UserError(f"'{spec}' names no model", "write 'openai:MODEL' or 'openai:MODEL@http://host:port/v1'")
    return LLMSpec("openai", model, url, key_env)


def public_spec(spec: str) -> str:
    """A spec (an LLM's, a component's, a scorer list, a unit source) as a published dataset shows
    it: a server by its model's name alone (its address and key variable are the user's own), a
    local file or folder by its name (`local:/home/me/m.gguf` -> `local:m.gguf`)."""
    spec = re.sub(r"@https?://[^#,\s]*", "", spec)
    spec = re.sub(r"#[A-Za-z_][A-Za-z0-9_]*(?=,|$)", "", spec)
    return re.sub(r"(?<=:)[/~][^:,#@]*", lambda m: m[0].rstrip("/").rpartition("/")[2] or m[0], spec)


def make_llm(spec: str | None = None, **kw):
    """Build an LLM; keyword arguments go to the backend (`LocalLLM`, `OpenAILLM`). A server LLM's
    max_concurrency and requests_per_minute default to `llm.server_limits` (see `llm.set_limits`)."""
    p = parse_llm(spec)
    if p.kind == "local":
        from autoexplain.llm_local import LocalLLM

        return LocalLLM(p.model, **kw)
    from autoexplain.llm import server_limits
    from autoexplain.llm_openai import OpenAILLM

    url = p.url if p.url is not None else kw.pop("base_url", None)
    return OpenAILLM(p.model, url, **{"api_key_env": p.key_env, **server_limits(url), **kw})  # limits: `llm.set_limits`


# ---- explainers ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ComponentSpec:
    spec: str  # as written (the default filled in)
    cls: type  # the component class
    llm: str | None  # the LLM spec it takes, or None
    per_request: int | None = None  # records per LLM request ('KIND/N:LLM'), None: the class's own


def parse_explainer(spec: str | None) -> ComponentSpec:
    spec = spec or DEFAULT_EXPLAINER
    classes = _explainer_classes()
    if spec.partition(":")[0] in classes:  # a registered kind: 'embedding', 'with-outputs[:LLM]'
        return _parse_kind("explainer", spec, classes)
    from autoexplain.explain import LLMExplainer

    if spec.partition(":")[0] not in ("local", "openai"):  # neither a registered kind nor an LLM: say both
        raise UserError(f"unknown explainer '{spec}'", f"{_usage(classes)}, or an LLM: {LLM_USAGE.removeprefix('use ')}")
    parse_llm(spec)
    return ComponentSpec(spec, LLMExplainer, spec)


def explainer_prompt(spec: str | None) -> str:
    """The hash of the prompt files the explainer a spec names reads ('' for none): editing them
    changes what it wrote, and editing another explainer's changes nothing of its."""
    from autoexplain.explain import prompt_hash

    files = parse_explainer(spec).cls.prompt_files
    return prompt_hash(*files) if files else ""


def make_explainer(spec: str | None = None):
    """'embedding' (offline default, no LLM), another registered explainer, or an LLM spec."""
    p = parse_explainer(spec)
    return p.cls() if p.llm is None else p.cls(make_llm(p.llm))


# ---- simulators ----------------------------------------------------------------------------------

def _usage(classes: dict[str, type]) -> str:
    forms = [k + {"none": "", "optional": "[:LLM]", "required": ":LLM"}[c.takes_llm] for k, c in classes.items()]
    quoted = [f"'{f}'" for f in forms]
    return "use " + (", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0])


def simulator_usage() -> str:
    return _usage(_simulator_classes())


def _parse_kind(role: str, spec: str, classes: dict[str, type]) -> ComponentSpec:
    """'KIND' or 'KIND:LLM' against the classes of one role (see the module docstring), 'KIND/N...'
    for a simulator that can put N records in one request (`_per_request`)."""
    kind, colon, llm = spec.partition(":")
    kind, slash, per = kind.partition("/")
    cls = classes.get(kind)
    if cls is None:
        raise UserError(f"unknown {role} '{spec}'", _usage(classes))
    per_request = _per_request(role, spec, cls, per) if slash else None
    if cls.takes_llm == "none":
        if llm:
            raise UserError(f"the {kind} {role} takes no LLM ('{spec}')", f"write just '{kind}'")
        return ComponentSpec(spec, cls, None)
    if cls.takes_llm == "required" and not llm:
        raise UserError(f"{kind} needs an LLM", f"write '{kind}/N:openai:MODEL@URL' or '{kind}:local'"
                        if slash else f"write '{kind}:openai:MODEL@URL' or '{kind}:local'")
    llm = llm or DEFAULT_LLM
    on_server = parse_llm(llm).kind != "local"
    if not slash:
        return ComponentSpec(spec, cls, llm)
    # A setting that cannot change the outputs (all-at-once on a local model reads one record per
    # forward pass) or that is the default is left out of the spec, so it keys nothing.
    spec = f"{kind}{cls.packing(per_request, on_server)}{colon}{spec.partition(':')[2]}"
    return ComponentSpec(spec, cls, llm, per_request if cls.shares_requests(on_server) else None)


def _per_request(role: str, spec: str, cls: type, text: str) -> int:
    """N of 'KIND/N:LLM': how many records of one explanation share one request."""
    kind = cls.kind
    if getattr(cls, "records_per_request", None) is None:
        raise UserError(f"the {kind} {role} puts no records in LLM requests ('{spec}'), so takes no '/{text}'",
                        f"write '{spec.replace('/' + text, '', 1)}'")
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < 1:
        rest = spec.partition(":")[2] or "LLM"
        raise UserError(f"'{spec}': records per request must be a whole number of at least 1, got '{text}'",
                        f"write '{kind}:{rest}' for one record per request (the paper's format), or "
                        f"'{kind}/N:{rest}' with N >= 1 to share each request between N records")
    return n


def parse_simulator(spec: str | None) -> ComponentSpec:
    """The simulator's class and LLM spec; UserError for an unknown kind or a wrong LLM part (the
    LLM spec itself is checked too)."""
    return _parse_kind("simulator", spec or DEFAULT_SIMULATOR, _simulator_classes())


def make_simulator(spec: str | None = None):
    p = parse_simulator(spec)
    if p.llm is None:
        return p.cls()
    return p.cls(make_llm(p.llm), **({} if p.per_request is None else {"records_per_request": p.per_request}))


# ---- scorers and unit sources --------------------------------------------------------------------

def parse_scorer(spec: str | None) -> ComponentSpec:
    return _parse_kind("scorer", spec or DEFAULT_SCORER, _scorer_classes())


def make_scorer(spec: str | None = None):
    """'simulation' (the default: the simulate stage's predictions against the truth), or another
    registered scorer ('detection[:LLM]', 'fuzzing[:LLM]', 'fuzzing-active[:LLM]', 'intruder[:LLM]',
    'embedding'). Its `name`, as stored in score rows, is the spec as written."""
    p = parse_scorer(spec)
    scorer = p.cls() if p.llm is None else p.cls(make_llm(p.llm))
    scorer.name = p.spec
    return scorer


def parse_scorers(specs: str | list[str] | None) -> list[ComponentSpec]:
    """A comma-separated list of scorer specs ('simulation,detection,fuzzing:openai:M@URL'), each
    checked; the default is ['simulation']."""
    if isinstance(specs, str) or specs is None:
        specs = (specs or DEFAULT_SCORER).split(",")
    parsed = [parse_scorer(s.strip()) for s in specs if s.strip()]
    if not parsed:
        raise UserError("no scorer named", f"pass e.g. --scorers {DEFAULT_SCORER},detection")
    seen = [p.spec for p in parsed]
    dup = next((s for s in seen if seen.count(s) > 1), None)
    if dup:
        raise UserError(f"scorer '{dup}' is named twice", "name each scorer once")
    return parsed


def uses_server(explainer: str | None = None, simulator: str | None = None, scorers: str | list[str] | None = None) -> bool:
    """Whether any component of a run asks a server LLM (an 'openai:' spec)."""
    parsed = [parse_explainer(explainer), parse_simulator(simulator), *parse_scorers(scorers)]
    return any(p.llm is not None and parse_llm(p.llm).kind == "openai" for p in parsed)


def make_source(kind: str | None = None):
    """The unit source of this kind ('mlp', the default)."""
    kind = kind or DEFAULT_SOURCE
    classes = _source_classes()
    if kind not in classes:
        raise UserError(f"unknown unit source '{kind}'",
                        "use " + ", ".join(f"'{k}'" for k in classes) + ", 'sae:PATH' or 'transcoder:PATH' (a coder's folder)")
    return classes[kind]()


def component_identity(cls: type) -> dict:
    """A component class's identity: its kind, settings, prompt files and their hash."""
    from autoexplain.explain import prompt_hash

    return {"kind": cls.kind, "settings": dict(cls.settings), "prompt_files": list(cls.prompt_files),
            "prompt": prompt_hash(*cls.prompt_files)}


def simulator_identity(spec: str | None) -> str:
    """What a simulator's output depends on besides its inputs, without loading any model:
    'SPEC|PROMPT_HASH', plus '|SETTINGS_HASH' when its class declares settings, plus '|WEIGHTS'
    when its LLM is a local model folder or file (`llm_weights`)."""
    p = parse_simulator(spec)
    ident = component_identity(p.cls)
    out = f"{p.spec}|{ident['prompt']}"
    if ident["settings"]:
        from autoexplain.storage import content_key

        out += "|" + content_key(ident["settings"], 16)
    weights = llm_weights(p.llm) if p.llm is not None else ""
    return out + "|" + weights if weights else out


def simulator_of(identity: str) -> str:
    """The simulator spec a `simulator_identity` was made from."""
    return identity.split("|", 1)[0]


def llm_weights(spec: str | None) -> str:
    """A local LLM's model content (`weights.model_digest`: every file's full sha256, computed once
    per file version), the same string as its loaded `Subject.fingerprint`: not where it lies, so a
    copy elsewhere is the same model; '' for a server LLM or a hub name, known by name only."""
    p = parse_llm(spec)
    if p.kind != "local":
        return ""
    from pathlib import Path

    from autoexplain import defaults
    from autoexplain.weights import model_digest

    path = Path(defaults.resolve_model(p.model or defaults.SUBJECT)).expanduser()
    return model_digest(path) if path.exists() else ""


def keyed_spec(p: ComponentSpec) -> str:
    """A component's spec as content keys take it: a local LLM given by path (or alias) written as
    'local', its `llm_weights` beside it in the key standing for it, so the same model in two
    folders is one key; a hub or server LLM as written (`layer.key_name` does this for a built one)."""
    if p.llm is None or not p.spec.endswith(p.llm) or not llm_weights(p.llm):
        return p.spec
    return p.spec[: len(p.spec) - len(p.llm)] + DEFAULT_LLM


def explainer_weights(spec: str | None) -> str:
    """`llm_weights` of an explainer's LLM ('' for an explainer without one)."""
    llm = parse_explainer(spec).llm
    return llm_weights(llm) if llm is not None else ""
