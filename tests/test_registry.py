"""The registry: spec strings to components; a simulator added through the public registration
function runs in the explain-layer flow like a built-in one."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from autoexplain import registry
from autoexplain.components import Simulator
from autoexplain.errors import UserError
from autoexplain.simulate import Simulation


class ToySimulator(Simulator):
    """Predicts each token's length (capped at 10): a rule no built-in simulator follows."""

    kind = "toy"
    name = "toy"

    def simulate(self, explanation, records):
        return [Simulation([float(min(len(t), 10)) for t in tokens]) for tokens in records]


@pytest.fixture
def toy():
    registry.register_simulator(ToySimulator)
    yield ToySimulator
    registry.unregister("toy")


def test_builtin_grammar_and_identity_load_nothing():
    from autoexplain.embedding import EmbeddingSimulator
    from autoexplain.explain import LLMExplainer, prompt_hash
    from autoexplain.explain_embedding import EmbeddingExplainer
    from autoexplain.simulate import AllAtOnceSimulator

    assert registry.parse_simulator(None).cls is EmbeddingSimulator
    p = registry.parse_simulator("all-at-once")
    assert (p.cls, p.llm) == (AllAtOnceSimulator, "local")
    assert registry.parse_explainer("embedding").cls is EmbeddingExplainer
    assert registry.parse_explainer("openai:m@http://h:1/v1").cls is LLMExplainer
    assert registry.parse_llm("openai:llama3:8b@http://h:1/v1") == registry.LLMSpec("openai", "llama3:8b", "http://h:1/v1")
    # The identity comes from the class's declared prompt files, as the hand-kept table had it.
    # A local LLM adds its weights' digest (`weights.model_digest`, the loaded subject's fingerprint).
    weights = registry.llm_weights("local")
    assert len(weights) == 16 and ":" not in weights  # its content alone, not its file's name
    assert registry.simulator_identity("all-at-once") == \
        f"all-at-once|{prompt_hash('simulator_system.txt', 'fewshot.json')}|{weights}"
    assert registry.simulator_identity("chat-json:local") == f"chat-json:local|{prompt_hash('simulator_system.txt')}|{weights}"
    assert registry.simulator_identity(None) == f"embedding|{prompt_hash('embedding_simulator.json')}"


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "unknown simulator 'nonsense'"),
    ("chat-json", "chat-json needs an LLM"),
    ("embedding:local", "the embedding simulator takes no LLM"),
    ("all-at-once:bogus", "unknown LLM 'bogus'"),
    ("all-at-once:openai:gpt-4o-mini@localhost:18401/v1", "the server address after '@' has no http://"),
    ("chat-json:openai:m@10.0.0.5:8000/v1", r"write 'openai:m@http://10\.0\.0\.5:8000/v1'"),
    ("all-at-once:openai:m@notaurl", r"the server address after '@' has no http:// or https:// — write 'openai:m@http://notaurl'"),
    ("all-at-once:openai:m@", "no server address follows '@'"),
    ("all-at-once/0:openai:m@http://h:1/v1", "records per request must be a whole number of at least 1, got '0' — "
                                            r"write 'all-at-once:openai:m@http://h:1/v1' for one record per request"),
    ("all-at-once/-3:openai:m@http://h:1/v1", "at least 1, got '-3'"),
    ("chat-json/2.5:openai:m@http://h:1/v1", r"at least 1, got '2\.5'"),
    ("all-at-once/x", r"got 'x' — write 'all-at-once:LLM' for one record per request"),
    ("chat-json/", "at least 1, got ''"),
    ("embedding/5", "the embedding simulator puts no records in LLM requests .* — write 'embedding'"),
])
def test_bad_simulator_specs(spec, message):
    with pytest.raises(UserError, match=message):
        registry.parse_simulator(spec)


SERVER, M = "openai:m@http://127.0.0.1:9/v1", "m"  # a server LLM is named by its model


def test_records_per_request_keys_what_it_can_change_and_nothing_else():
    """'KIND/N:LLM' is part of a simulator's identity and name (its outputs' keys) where records
    share a request: all-at-once on a server, chat-json on any LLM. The default (1, the paper's
    format) written out is the same key as left out, and all-at-once on a local model, which reads
    one record per forward pass whatever N says, keys the same for every N."""
    from autoexplain.layer import key_name

    ident = registry.simulator_identity
    assert ident(f"all-at-once/5:{SERVER}") != ident(f"all-at-once:{SERVER}")
    assert ident(f"all-at-once/5:{SERVER}") != ident(f"all-at-once/4:{SERVER}")
    assert ident(f"all-at-once/1:{SERVER}") == ident(f"all-at-once:{SERVER}")
    assert ident("all-at-once/5") == ident("all-at-once") and ident("all-at-once/5:local") == ident("all-at-once:local")
    assert ident("chat-json/4:local") != ident("chat-json:local") == ident("chat-json/1:local")
    assert registry.parse_simulator(f"all-at-once/05:{SERVER}").spec == f"all-at-once/5:{SERVER}"
    assert registry.parse_simulator("all-at-once/5:local").per_request is None, "nothing to hand a local model"
    packed = registry.make_simulator(f"all-at-once/5:{SERVER}")
    assert packed.records_per_request == 5 and key_name(packed) == f"all-at-once/5:{M}"
    single = registry.make_simulator(f"all-at-once:{SERVER}")
    assert single.records_per_request == 1 and key_name(single) == f"all-at-once:{M}"
    chat = registry.make_simulator(f"chat-json/3:{SERVER}")
    assert (chat.records_per_request, chat.name) == (3, f"chat-json/3:{M}")
    single.records_per_request = 2  # a setting changed after construction is keyed as what it is now
    assert key_name(single) == f"all-at-once/2:{M}"


def test_only_a_version_tag_after_at_is_the_model_s_name():
    """Vertex-style names keep their digits after '@'; any other text there is a server address."""
    assert registry.parse_llm("openai:text-bison@002") == registry.LLMSpec("openai", "text-bison@002", None)
    assert registry.parse_llm("openai:m@https://host/v1#MY_KEY") == registry.LLMSpec("openai", "m", "https://host/v1", "MY_KEY")


def test_a_misspelt_explainer_is_offered_the_explainers_and_the_llms():
    """'embeding' is neither a registered explainer nor an LLM: the fix names both, the default first."""
    with pytest.raises(UserError) as e:
        registry.parse_explainer("embeding")
    assert e.value.problem == "unknown explainer 'embeding'"
    assert "'embedding'" in e.value.fix and "'openai:MODEL'" in e.value.fix
    with pytest.raises(UserError, match="the server address after '@' has no http://"):
        registry.parse_explainer("openai:m@localhost:8000/v1")  # an LLM spec's own errors stay its own


def test_a_registered_simulator_is_known_everywhere(toy):
    from autoexplain import preflight

    assert registry.parse_simulator("toy").cls is toy
    assert "'toy'" in registry.simulator_usage()
    preflight.check_simulator("toy")
    with pytest.raises(UserError, match="the toy simulator takes no LLM"):
        preflight.check_simulator("toy:local")
    assert registry.simulator_identity("toy") == f"toy|{registry.component_identity(toy)['prompt']}"
    assert isinstance(registry.make_simulator("toy"), toy)
    with pytest.raises(TypeError):
        registry.register_simulator(object)


def test_toy_simulator_runs_in_the_flow(toy, prefect_results, tiny_llama_dir, prose_corpus, tmp_path):
    from autoexplain.flows.explain_layer import explain_layer

    out = tmp_path / "out"
    result = explain_layer(layer=1, units="0-5", model=tiny_llama_dir, corpus=str(prose_corpus), tokens=20_000,
                           explainer="embedding", simulator="toy", k=2, shard_size=4, n_boot=50, out=str(out),
                           window_len=8, top_k=8, n_random=6)
    assert result["scores"]
    tables = sorted(Path(out, "simulations").glob("*/layer_1.parquet"))
    assert tables
    windows = {r["window_id"]: r["tokens"] for r in pq.read_table(Path(result["records"]["windows"])).to_pylist()}
    n = 0
    for path in tables:
        for row in pq.read_table(path).to_pylist():
            assert row["simulator"] == "toy"
            assert row["expected"] == [float(min(len(t), 10)) for t in windows[row["window_id"]]]
            n += 1
    assert n > 0
