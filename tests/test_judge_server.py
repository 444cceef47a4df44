"""The judge against a real HTTP server on 127.0.0.1: configuration from PAPO_JUDGE_* variables,
failures over the wire, and a training run that stops on a refused key."""

import json
import threading

import pytest
from test_judge_backends import NINE, TOO_LONG, ok

from papo_fast.rewards import Outcome, Verifier, compute_rewards
from papo_fast.rewards.judge import (
    JudgeConfigError,
    openai_rubric_judge,
)
from papo_fast.rewards.verify import MathVerifier

# ----------------------------------------------------------------------------- a real HTTP server


class FakeOpenAIServer:
    """A local OpenAI-compatible chat endpoint: 401 unless the key is "sk-good", 404 for a model
    other than "judge", 400 for a prompt holding "[too long]", otherwise \\boxed{1}."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    status, out = 404, {"detail": "Not Found"}
                elif self.headers.get("Authorization") != "Bearer sk-good":
                    status, out = 401, {"error": {"message": "invalid api key"}}
                elif body["model"] != "judge":
                    status, out = 404, {"error": {"message": "The model does not exist."}}
                elif "[too long]" in body["messages"][-1]["content"]:
                    status, out = TOO_LONG
                else:
                    status, out = ok(r"\boxed{1}")
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def judge_env(monkeypatch):
    """The PAPO_JUDGE_* variables of a working judge on a fake local server."""
    pytest.importorskip("httpx")
    server = FakeOpenAIServer()
    for var, value in {
        "PAPO_JUDGE_BASE_URL": server.url,
        "PAPO_JUDGE_MODEL": "judge",
        "PAPO_JUDGE_API_KEY": "sk-good",
        "PAPO_JUDGE_RETRIES": "1",
    }.items():
        monkeypatch.setenv(var, value)
    yield server
    server.close()


def test_failures_over_http_from_the_environment(judge_env, monkeypatch):
    judge = openai_rubric_judge()
    rw = compute_rewards(MathVerifier(), judge, ["2+2"] * 9, NINE, ["4"] * 9)
    assert rw.process == [1.0] * 4 + [0.0] + [1.0] * 4 and rw.judge_invalid == 1
    monkeypatch.setenv("PAPO_JUDGE_API_KEY", "sk-wrong")
    with pytest.raises(JudgeConfigError, match="HTTP 401") as err:
        compute_rewards(MathVerifier(), judge, ["2+2"], [r"\boxed{4}"], ["4"])
    assert "sk-wrong" not in str(err.value)
    monkeypatch.setenv("PAPO_JUDGE_API_KEY", "sk-good")
    monkeypatch.setenv("PAPO_JUDGE_MODEL", "no-such-model")
    with pytest.raises(JudgeConfigError, match="HTTP 404.*'no-such-model'"):
        compute_rewards(MathVerifier(), openai_rubric_judge(), ["2+2"], [r"\boxed{4}"], ["4"])
    monkeypatch.setenv("PAPO_JUDGE_MODEL", "judge")
    monkeypatch.setenv("PAPO_JUDGE_BASE_URL", judge_env.url.removesuffix("/v1"))  # no /v1
    with pytest.raises(JudgeConfigError, match="HTTP 404.*PAPO_JUDGE_BASE_URL"):
        compute_rewards(MathVerifier(), openai_rubric_judge(), ["2+2"], [r"\boxed{4}"], ["4"])


class AlwaysRight(Verifier):
    """Every response correct: every one goes to the judge."""

    def verify(self, problems, responses, answers):
        return [Outcome(1.0, True) for _ in responses]


@pytest.mark.usefixtures("one_thread")
def test_training_run_stops_with_exit_code_2_on_a_refused_key(
    judge_env, monkeypatch, tmp_path, capsys
):
    """The whole command: a refused key ends `papo-fast train` with the reason, exit code 2,
    instead of a run whose process scores are all 0."""
    import yaml

    from papo_fast.cli import main
    from papo_fast.rewards import base as rewards
    from papo_fast.tasks import arith

    tok = arith.build_tokenizer()
    tok.save_pretrained(tmp_path / "model")
    arith.build_model(tok, hidden_size=64, layers=1, seed=0).save_pretrained(tmp_path / "model")
    arith.write_jsonl(arith.make_split(0, 8, 2, 3), tmp_path / "train.jsonl")
    monkeypatch.setitem(rewards.VERIFIERS, "always_right", AlwaysRight)
    config = {
        "model": {"path": str(tmp_path / "model")},
        "data": {"train_path": str(tmp_path / "train.jsonl")},
        "rollout": {"group_size": 2, "max_new_tokens": 4},
        "reward": {
            "verifier": "always_right",
            "judge": "papo_fast.rewards.judge:openai_rubric_judge",
        },
        "train": {
            "out_dir": str(tmp_path / "run"),
            "steps": 1,
            "prompts_per_step": 2,
            "mini_batches": 1,
            "micro_batch_size": 4,
            "progress": False,
        },
    }
    (tmp_path / "papo.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("PAPO_JUDGE_API_KEY", "sk-wrong")
    assert main(["train", str(tmp_path / "papo.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("papo-fast: error: ") and "HTTP 401" in err
    assert "PAPO_JUDGE_API_KEY" in err and "sk-wrong" not in err
