"""The command line: JSON output, streaming, and one-line errors with a non-zero exit for bad input."""
import json

import pytest

from decodekit.cli import main

TINY = ["--model", "random:tiny-llama", "--device", "cpu"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json(capsys):
    code, out, _ = run(capsys, "generate", *TINY, "--prompt", "hello", "--max-new-tokens", "12", "--json", "--raw")
    assert code == 0
    payload = json.loads(out)
    assert len(payload["token_ids"]) == 12 and payload["stats"]["generated_tokens"] == 12
    assert {"text", "token_ids", "stats"} <= payload.keys()


def test_generate_json_with_method_matches_plain(capsys):
    args = ["generate", *TINY, "--prompt", "abcabcabcabc", "--max-new-tokens", "16", "--json", "--raw"]
    plain = json.loads(run(capsys, *args)[1])
    pld = json.loads(run(capsys, *args, "--method", "pld", "-O", "num_draft=4")[1])
    assert pld["token_ids"] == plain["token_ids"]
    assert pld["stats"]["method"] == "pld" and "tau" in pld["stats"]


def test_generate_streams_text(capsys):
    code, out, err = run(capsys, "generate", *TINY, "--prompt", "hi", "--max-new-tokens", "5", "--raw")
    assert code == 0 and "tok/s" in err


@pytest.mark.parametrize("bad, message", [
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-k", "-3"], "top_k must be an integer >= 0"),
    (["--min-p", "2"], "min_p must be in [0, 1]"),
    (["--device", "tpu"], "unknown device"),
    (["--device", "cuda:0"], "no CUDA GPU"),
    (["--method", "nosuch"], "unknown method 'nosuch'"),
    (["--method", "pld", "-O", "bogus=1"], "unknown option 'bogus' for method 'pld'"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
])
def test_bad_input_is_one_line_error(capsys, bad, message):
    import torch

    if "cuda" in " ".join(bad) and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = run(capsys, "generate", *TINY, "--prompt", "hi", "--raw", *bad)
    assert code == 1
    assert err.startswith("decodekit: error: ") and message in err and err.count("\n") == 1


def test_unknown_model_is_one_line_error(capsys):
    code, _, err = run(capsys, "generate", "--model", "no-such-model", "--prompt", "hi")
    assert code == 1 and "unknown model source" in err and err.count("\n") == 1


def test_missing_model_folder(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "nowhere.gguf"), "--prompt", "hi")
    assert code == 1 and err.startswith("decodekit: error:")


def test_prompt_longer_than_context(capsys):
    code, _, err = run(capsys, "generate", *TINY, "--prompt", "x" * 3000, "--raw")
    assert code == 1 and "context window" in err


def test_methods_lists_registered_drafters(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0 and "pld" in out and "plain" in out
