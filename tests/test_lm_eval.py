"""EleutherAI's lm-evaluation-harness, unmodified, against a real dzjax server: multiple-choice
(log-likelihood) and generation tasks on small local JSONL data, every log-likelihood equal to
`dzjax.score` on the same tokens.

Slow, and skipped unless lm-eval is found: it needs torch, so it lives in its own Python 3.11
venv (`python3.11 -m venv lmeval && lmeval/bin/pip install torch==2.13.0 "lm-eval[api]"
transformers`); point DZJAX_LM_EVAL at its `lm_eval` (or have `lm_eval` on PATH).
"""

import json
import os
import shutil
import subprocess

import jax.numpy as jnp
import pytest
from conftest import fixture_dir, make_deltas
from test_http import start_uvicorn

import dzjax
from dzjax.serving.http import make_app

LM_EVAL = os.environ.get("DZJAX_LM_EVAL") or shutil.which("lm_eval")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(LM_EVAL is None, reason="lm-eval is not installed (it needs "
                                 "torch: see this module's docstring)")]

# Contexts and choices from the fixture's own domain (Python code and prose), the right choice
# first in half the documents.
CHOICE_DOCS = [
    {"context": "def add(a, b):\n    return", "choices": [" a + b", " the cat", " )))"],
     "label": 0},
    {"context": "import os\nimport", "choices": [" 42 42", " sys", " (("], "label": 1},
    {"context": "for i in range(10):\n   ", "choices": [" print(i)", " ]]]", " and the"],
     "label": 0},
    {"context": "class Foo:\n    def", "choices": [" ,,,", " __init__(self):", " of"],
     "label": 1},
    {"context": "The function returns", "choices": [" the value", " ::", " ]["], "label": 0},
    {"context": "if x is None:\n   ", "choices": [" ))", " return None", " 1 1 1"],
     "label": 1},
]
GEN_DOCS = [{"context": "def main(", "answer": "):"}, {"context": "import", "answer": " os"},
            {"context": "The", "answer": " function"}]


def _task(directory, name, data, body) -> None:
    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in data))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {path}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    base_dir = fixture_dir("trained") / "base"
    paths = make_deltas(base_dir, tmp, 1)
    base = dzjax.load_base(base_dir, dtype=jnp.float32)
    tasks = tmp / "tasks"
    tasks.mkdir()
    _task(tasks, "dz_choice", CHOICE_DOCS,
          'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
          'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
          "metric_list:\n  - metric: acc\n")
    _task(tasks, "dz_gen", GEN_DOCS,
          'output_type: generate_until\ndoc_to_text: "{{context}}"\n'
          'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
          "  max_gen_toks: 6\n  do_sample: false\n  temperature: 0\n"
          "metric_list:\n  - metric: exact_match\n")
    server = dzjax.serve(base, paths, max_batch=8, max_seq_len=128)
    http, thread, url = start_uvicorn(make_app(server))
    out = tmp / "results"
    env = {k: v for k, v in os.environ.items() if k not in ("PYENV_VERSION", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        run = subprocess.run(
            [LM_EVAL, "--model", "local-completions", "--tasks", "dz_choice,dz_gen",
             "--include_path", str(tasks), "--output_path", str(out), "--log_samples",
             "--model_args", f"model=ft0,base_url={url}/v1/completions,"
             "tokenizer_backend=remote,num_concurrent=4,max_retries=1"],
            capture_output=True, text=True, timeout=900, env=env)
    finally:
        http.should_exit = True
        thread.join(timeout=30)
        stats = server.stats()
        server.close()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    return base, dzjax.load_delta(paths["ft0"]), samples, results, stats


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """As lm-eval's remote tokenizer pairs them: no special tokens, the context's trailing
    spaces moved to the continuation, the continuation split off the whole's tokens."""
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


def test_multiple_choice_log_likelihoods_equal_dzjax_score(evaluated):
    base, delta, samples, results, stats = evaluated
    docs = samples["dz_choice"]
    assert len(docs) == len(CHOICE_DOCS)
    checked = 0
    for doc in docs:
        for args, resp in zip(doc["arguments"].values(), doc["resps"]):
            context, continuation = args["arg_0"], args["arg_1"]
            ctx, cont = _encode_pair(base.tokenizer, context, continuation)
            scores = dzjax.score(base, [ctx + cont], deltas=[delta], rows=[0])
            loglik, greedy = scores.sum(start=len(ctx))
            got_loglik, got_greedy = resp[0]
            assert abs(float(got_loglik) - float(loglik[0])) <= 1e-3 * max(1, abs(loglik[0]))
            assert str(got_greedy) == str(bool(greedy[0]))  # (logged as text: "True"/"False")
            checked += 1
    assert checked == sum(len(d["choices"]) for d in CHOICE_DOCS)
    acc = results["results"]["dz_choice"]["acc,none"]
    assert 0 <= acc <= 1
    assert stats["finished"].get("error", 0) == 0


def test_generation_task_answers_are_the_server_greedy_ones(evaluated):
    base, delta, samples, results, _ = evaluated
    docs = samples["dz_gen"]
    assert len(docs) == len(GEN_DOCS)
    for doc in docs:
        context = doc["arguments"]["gen_args_0"]["arg_0"]
        ids = base.tokenizer(context, add_special_tokens=False)["input_ids"]
        want = base.tokenizer.decode(dzjax.generate(base, [ids], delta=delta, max_tokens=6)[0])
        got = doc["resps"][0][0]
        assert got == want.split("\n")[0], (context, got, want)
    assert "exact_match,none" in results["results"]["dz_gen"]
