"""The lm-evaluation-harness adapter: log-likelihoods against a per-prefix reference, generation through the
engine, and an offline lm_eval run on local tasks (no hub download)."""
from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from decodekit.eval import lm_harness  # noqa: E402
from decodekit.models.kv_cache import private_pool  # noqa: E402
from decodekit.eval.lm_harness import DecodekitLM  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    return DecodekitLM(model="random:tiny-llama", device="cpu", max_length=64, max_gen_toks=16)


def reference_logprobs(lm, ids: list[int], n: int) -> list[float]:
    """log P(ids[i] | ids[:i]) for the last n tokens: one fresh pass over each whole prefix in its own KV memory,
    last position's logits only (no chunks, no memory reused)."""
    model = lm.engine.model
    out = []
    for i in range(len(ids) - n, len(ids)):
        _, kv = private_pool(model, i)
        with torch.inference_mode():
            logits = model.forward_seq(kv, ids[:i], list(range(i)), logits="last")[-1].float()
        out.append(float(logits.log_softmax(-1)[ids[i]]))
    return out


@pytest.mark.parametrize("chunk", [512, 3])  # one pass, and chunks through the KV cache
def test_score_tokens_matches_per_prefix_reference(lm, monkeypatch, chunk):
    monkeypatch.setattr(lm_harness, "SCORE_CHUNK", chunk)
    ids = [5 + (i * 37) % 250 for i in range(20)]
    total, _ = lm.score_tokens(ids, 6)
    assert total == pytest.approx(sum(reference_logprobs(lm, ids, 6)), abs=1e-3)


def test_is_greedy_follows_greedy_decoding(lm):
    context = lm.tok_encode("The quick brown fox")
    greedy = lm.engine.generate(context, 6, ignore_eos=True).token_ids
    logprob, is_greedy = lm.score_tokens(context + greedy, len(greedy))
    assert is_greedy and logprob <= 0.0
    other = greedy[:-1] + [greedy[-1] + 1 if greedy[-1] + 1 < 259 else 3]
    worse, is_greedy = lm.score_tokens(context + other, len(other))
    assert not is_greedy and worse < logprob


def test_loglikelihood_requests(lm):
    requests = [Instance("loglikelihood", {}, ("Q: abc\nA:", " abc"), 0),
                Instance("loglikelihood", {}, ("", "hello"), 1)]
    (ll, _), (ll_empty, _) = lm.loglikelihood(requests, disable_tqdm=True)
    ctx, cont = lm.tok_encode("Q: abc\nA:"), lm.tok_encode(" abc", add_special_tokens=False)
    assert ll == pytest.approx(sum(reference_logprobs(lm, ctx + cont, len(cont))), abs=1e-3)
    hello = lm.tok_encode("hello", add_special_tokens=False)  # empty context: the prefix token stands in
    assert ll_empty == pytest.approx(sum(reference_logprobs(lm, [lm.prefix_token_id, *hello], len(hello))), abs=1e-3)


def test_loglikelihood_rolling(lm):
    text = "abcdefghij" * 3
    ids = lm.tok_encode(text, add_special_tokens=False)
    (one_window,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert one_window == pytest.approx(sum(reference_logprobs(lm, [lm.prefix_token_id, *ids], len(ids))), abs=1e-3)
    short = DecodekitLM(model="random:tiny-llama", device="cpu", max_length=8)  # forces several windows
    (windows,) = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert windows < 0.0 and windows != pytest.approx(one_window, abs=1e-6)


def test_generation_kwargs(lm):
    call, max_new = lm.generation_kwargs({"until": "\n", "max_gen_toks": 7, "do_sample": False, "temperature": 0.8,
                                          "num_beams": 1})
    assert call["stop"] == ["\n"] and max_new == 7 and call["sampling"].greedy and call["method"] == "plain"
    assert "num_beams" not in call  # ignored, with a warning
    call, max_new = lm.generation_kwargs({"until": ["a", "b"], "do_sample": True, "top_p": 0.9})
    assert call["stop"] == ["a", "b"] and call["sampling"].temperature == 1.0 and call["sampling"].top_p == 0.9
    assert max_new == 16


def test_generate_until_matches_the_engine(lm):
    requests = [Instance("generate_until", {}, (f"Q: {q}\nA:", {"until": ["\n"], "max_gen_toks": 10}), i)
                for i, q in enumerate(["abc", "hello", "xyz"])]
    texts = lm.generate_until(requests, disable_tqdm=True)
    for request, text in zip(requests, texts):
        expected = lm.engine.generate(lm.tok_encode(request.args[0]), 10, stop=["\n"], temperature=0.0).text
        assert text == expected and "\n" not in text


TASK_DATA = [{"question": "abc", "answer": "abc", "choices": ["abc", "xyz"], "label": 0},
             {"question": "hello", "answer": "world", "choices": ["world", "there"], "label": 1}]
TASKS = {
    "dk_gen": "output_type: generate_until\ndoc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_target: \"{{answer}}\"\n"
              "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
              "metric_list:\n  - metric: exact_match\n",
    "dk_mc": "output_type: multiple_choice\ndoc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_choice: \"{{choices}}\"\n"
             "doc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n",
    "dk_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{question}} {{answer}}\"\n"
              "metric_list:\n  - metric: bits_per_byte\n",
}


@pytest.mark.slow
def test_lm_eval_command_line_on_local_tasks(tmp_path, monkeypatch):
    """`decodekit-lm-eval --model decodekit ...` on three tiny local tasks: generation, multiple choice (loglikelihood)
    and perplexity (loglikelihood_rolling); a random byte-level model scores about log2(512) = 9 bits per byte."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TASK_DATA))
    for name, body in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                               f"    test: {data}\ntest_split: test\n{body}")
    out = tmp_path / "out"
    lm_harness.main(["--model", "decodekit", "--model_args", "model=random:tiny-llama,method=pld,max_length=64",
                     "--tasks", ",".join(TASKS), "--include_path", str(tmp_path), "--device", "cpu",
                     "--output_path", str(out)])
    (result_file,) = out.rglob("results_*.json")
    results = json.loads(result_file.read_text())["results"]
    assert results["dk_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)
    assert results["dk_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    assert 7.0 < results["dk_ppl"]["bits_per_byte,none"] < 11.0
