"""Characters per token of the prompts autoexplain sends, by SmolLM2's tokenizer (the embedded GGUF):
what a server LLM's budget hold and tokens-per-minute estimate assumed at 4 before e71e2c6.

    python bench/chars_per_token.py
"""

from llama_cpp import Llama
from autoexplain.defaults import corpus_texts, resolve_model
from autoexplain.explain import build_prompt
from autoexplain.records import ActivationRecord
from autoexplain.simulate import simulator_body, simulator_prefix

llm = Llama(resolve_model("smollm2"), vocab_only=True, verbose=False)
count = lambda text: len(llm.tokenize(text.encode(), add_bos=False))
tokens = [llm.detokenize([t]).decode("utf-8", "replace") for t in llm.tokenize(corpus_texts()[3][:3000].encode(), add_bos=False)][:64]
prompts = {"simulator (all-at-once, 64-token record)": simulator_prefix("years and numbers") + simulator_body(tokens)[0],
           "explainer (10 records of 64 tokens)": build_prompt([ActivationRecord(tokens, [float(i % 7) for i in range(64)])] * 10).text(),
           "corpus prose (3,000 characters)": corpus_texts()[3][:3000]}
for name, text in prompts.items():
    print(f"{name}: {len(text)} characters, {count(text)} tokens, {len(text) / count(text):.2f} characters a token")
