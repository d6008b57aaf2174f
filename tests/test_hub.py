"""hbt_accel.publishing.hub with the real huggingface_hub client against a stand-in Hub on 127.0.0.1 (no network).

The stand-in implements what huggingface_hub's whoami / create_repo / create_branch / upload_folder send (read from
huggingface_hub/hf_api.py and _commit_api.py): GET /api/whoami-v2, POST /api/repos/create,
POST /api/models/{repo}/branch/{branch}, POST /api/validate-yaml, POST /api/models/{repo}/preupload/{rev} (every file
"regular") and POST /api/models/{repo}/commit/{rev} (ndjson: a header line, then one line per file with its content
inline in base64). It records every request and the files of every commit.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from hbt_accel.config import ConfigError, HbtConfig
from hbt_accel.models.st_format import write_sentence_transformers_files
from hbt_accel.publishing.hub import check_hub_access, push_folder
from hbt_accel.publishing.model_card import write_model_card
from hbt_accel.run_record import BatchArithmetic, TrainSummary

USERS = {  # token -> whoami answer
    "write-token": {
        "type": "user",
        "name": "alice",
        "orgs": [{"name": "hbt-org"}],
        "auth": {"accessToken": {"role": "write"}},
    },
    "read-token": {"type": "user", "name": "alice", "orgs": [], "auth": {"accessToken": {"role": "read"}}},
}


class FakeHub:
    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        self.repos: dict[str, dict] = {}
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files": {path: bytes}}
        self.commit_status = 200  # set to 500 to play a Hub that fails uploads

    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> tuple[int, dict]:
        path = handler.path.split("?", 1)[0]
        self.requests.append((method, path))
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        token = (handler.headers.get("Authorization") or "").removeprefix("Bearer ")
        user = USERS.get(token)
        if user is None:
            return 401, {"error": "Invalid credentials in Authorization header"}
        if method == "GET" and path == "/api/whoami-v2":
            return 200, user
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or user['name']}/{payload['name']}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            # huggingface_hub < 1.x sends {"private": bool}, newer releases {"visibility": "private" | "public"}
            self.repos[repo_id] = {
                **payload,
                "private": payload.get("private", payload.get("visibility") == "private"),
            }
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
        if method == "POST" and match:
            repo_id, action, revision = match.groups()
            if repo_id not in self.repos:
                return 404, {"error": "Repository not found"}
            if action == "branch":
                self.branches.append((repo_id, revision))
                return 200, {}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {
                    "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                }
            if self.commit_status != 200:
                return self.commit_status, {
                    "error": "Internal Error - We're working hard to fix this as soon as possible!"
                }
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            assert all(line["key"] in ("header", "file") for line in lines), "only inline files expected"
            self.commits.append({"repo": repo_id, "revision": revision, "summary": header["summary"], "files": files})
            oid = f"{len(self.commits):040x}"
            return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        self.unexpected.append((method, path))
        return 404, {"error": f"stand-in hub: {method} {path} not implemented"}


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    hub = FakeHub()

    class Handler(BaseHTTPRequestHandler):
        def _respond(self, method):
            status, content = hub.handle(self, method)
            data = json.dumps(content).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._respond("GET")

        def do_POST(self):
            self._respond("POST")

        def do_HEAD(self):
            hub.unexpected.append(("HEAD", self.path))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # huggingface_hub reads HF_ENDPOINT into constants.ENDPOINT at import; HfApi() reads constants.ENDPOINT.
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", "write-token")
    yield hub
    server.shutdown()
    server.server_close()
    assert not hub.unexpected, f"requests the stand-in does not implement: {hub.unexpected}"


class RecordingAccelerator:
    """What push_folder uses of an Accelerator: is_main_process and the barrier."""

    def __init__(self, is_main_process: bool = True):
        self.is_main_process = is_main_process
        self.barriers = 0

    def wait_for_everyone(self):
        self.barriers += 1


def hub_cfg(**overrides) -> HbtConfig:
    values = {"push_to_hub": True, "hub_model_id": "alice/hbt-tiny", "eval_benchmark": "xquad-r"}
    values.update(overrides)
    return HbtConfig(**values)


RESULTS = {
    "benchmark": "xquad-r",
    "languages": ["de", "en"],
    "mono_map": 0.7,
    "cross_map": 0.6,
    "multi_map": 0.5,
    "rank_distance": 42.0,
    "recall_at_1": 0.55,
    "recall_at_10": 0.9,
    "grid": {"de-de": 0.71, "de-en": 0.61, "en-de": 0.59, "en-en": 0.69},
    "multi_map_per_language": {"de": 0.52, "en": 0.48},
    "rank_distance_per_language": {"de": 40.0, "en": 44.0},
    "n_queries": 20,
    "seconds": 3.0,
}


@pytest.fixture
def run_dir(tiny_encoder, tmp_path):
    """A finished run: the model + ST files + card, a checkpoint with training state, and leftovers of a crash."""
    out = tmp_path / "run"
    tiny_encoder.save_pretrained(out)
    write_sentence_transformers_files(out, tiny_encoder.settings)
    cfg = hub_cfg()
    summary = TrainSummary(cfg, BatchArithmetic.of(cfg, 1), steps=5, train_seconds=10.0, batch_counts={"X-X": 3})
    write_model_card(out, summary, RESULTS)
    (out / "train_summary.json").write_text(json.dumps(summary.to_json()))
    checkpoint = out / "checkpoint-5"
    (checkpoint / "model").mkdir(parents=True)
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "model.safetensors"):
        (checkpoint / name).write_bytes(b"training state")
    (checkpoint / "training_progress.json").write_text("{}")
    (checkpoint / "model" / "config.json").write_text("{}")
    (checkpoint / "model" / "model.safetensors").write_bytes(b"checkpoint weights")
    (out / ".tmp-checkpoint-10").mkdir()
    (out / ".tmp-checkpoint-10" / "optimizer.bin").write_bytes(b"half written")
    (out / ".README.md.x1.tmp").write_text("half a card")
    return out


# ---------------------------------------------------------------------------------------------------------------------
def test_push_uploads_the_model_folder_and_the_card(fake_hub, run_dir):
    accelerator = RecordingAccelerator()
    url = push_folder(accelerator, hub_cfg(hub_private=True), run_dir, "final model")
    assert accelerator.barriers == 1
    assert fake_hub.repos["alice/hbt-tiny"]["private"] is True
    (commit,) = fake_hub.commits
    assert url.endswith(f"/alice/hbt-tiny/commit/{1:040x}")
    assert commit["repo"] == "alice/hbt-tiny" and commit["revision"] == "main" and commit["summary"] == "final model"
    expected = {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "hbt_encoder.json",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "1_Pooling/config.json",
        "README.md",
        "train_summary.json",
    }
    assert expected <= set(commit["files"])
    assert not [p for p in commit["files"] if p.startswith(("checkpoint-", ".tmp")) or p.endswith(".tmp")]
    assert commit["files"]["model.safetensors"] == (run_dir / "model.safetensors").read_bytes()
    # the card that arrived carries the metrics in its model-index
    card = commit["files"]["README.md"].decode()
    metadata = yaml.safe_load(card.split("---\n")[1])
    metrics = {m["name"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert metrics["monolingual mAP"] == 0.7 and metrics["multilingual mAP"] == 0.5
    assert metrics["rank distance (language bias, lower is better)"] == 42.0
    assert "| **de** | 0.710 | 0.610 |" in card
    assert ("POST", "/api/validate-yaml") in fake_hub.requests  # the client checked the card's YAML first


def test_push_to_a_branch_with_checkpoints_leaves_training_state_out(fake_hub, run_dir):
    cfg = hub_cfg(hub_revision="experiment-1", hub_push_checkpoints=True)
    push_folder(RecordingAccelerator(), cfg, run_dir, "final model")
    push_folder(RecordingAccelerator(), cfg, run_dir, "again")  # the repo and the branch exist now: no error
    assert fake_hub.branches == [("alice/hbt-tiny", "experiment-1")] * 2
    first = fake_hub.commits[0]
    assert first["revision"] == "experiment-1"
    uploaded = {p for p in first["files"] if p.startswith("checkpoint-5/")}
    assert uploaded == {"checkpoint-5/model/config.json", "checkpoint-5/model/model.safetensors",
                        "checkpoint-5/training_progress.json"}  # fmt: skip


def test_push_happens_on_the_main_process_only(fake_hub, run_dir):
    accelerator = RecordingAccelerator(is_main_process=False)
    assert push_folder(accelerator, hub_cfg(), run_dir, "final model") is None
    assert fake_hub.requests == [] and accelerator.barriers == 1


def test_failed_push_still_reaches_the_barrier(fake_hub, run_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "revoked-token")
    accelerator = RecordingAccelerator()
    with pytest.raises(Exception, match="401|Invalid"):
        push_folder(accelerator, hub_cfg(), run_dir, "final model")
    assert accelerator.barriers == 1 and fake_hub.commits == []


# ---------------------------------------------------------------------------------------------------------------------
def test_check_hub_access_accepts_a_write_token(fake_hub):
    assert check_hub_access(hub_cfg())["name"] == "alice"
    assert check_hub_access(hub_cfg(hub_model_id="hbt-org/model"))["name"] == "alice"
    assert ("GET", "/api/whoami-v2") in fake_hub.requests
    assert check_hub_access(hub_cfg(push_to_hub=False)) is None


@pytest.mark.parametrize(
    "token, repo, message",
    [
        (None, "alice/m", r"push_to_hub: no Hugging Face token found for hub_model_id 'alice/m'; log in with"),
        ("revoked-token", "alice/m", r"push_to_hub: the Hub rejected the token"),
        ("read-token", "alice/m", r"push_to_hub: the token of 'alice' is read-only"),
        ("write-token", "bob/m", r"hub_model_id: 'bob/m' is in namespace 'bob'"),
    ],
)
def test_check_hub_access_fails_in_one_line(fake_hub, monkeypatch, token, repo, message):
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(ConfigError, match=message) as error:
        check_hub_access(hub_cfg(hub_model_id=repo))
    assert "\n" not in str(error.value)


def test_missing_token_fails_before_training(fake_hub, monkeypatch, tmp_path):
    import hbt_accel.training.run as train

    monkeypatch.delenv("HF_TOKEN")

    def no_data(*args, **kwargs):
        raise AssertionError("training started: data was loaded before the Hub check")

    monkeypatch.setattr(train, "load_training_corpus", no_data)
    cfg = hub_cfg(output_dir=str(tmp_path / "run"), mixed_precision="no")
    with pytest.raises(ConfigError, match="push_to_hub: no Hugging Face token"):
        train.main(cfg)
    assert fake_hub.requests == []
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
def test_an_unreachable_hub_is_not_reported_as_a_rejected_token(fake_hub, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:1")  # nothing listens there: refused
    with pytest.raises(ConfigError) as error:
        check_hub_access(hub_cfg())
    message = str(error.value)
    assert message.startswith("push_to_hub: cannot check the token (cannot reach http://127.0.0.1:1: ")
    assert "rejected" not in message and "\n" not in message


def test_a_push_that_fails_after_training_keeps_the_run_and_can_be_retried_alone(
    fake_hub, tiny_model_dir, mlqa_slice, tmp_path, monkeypatch
):
    """Train 2 steps into a Hub that answers HTTP 500 to the upload: one line, exit code 4, the local run complete;
    then `recipes/push.py --run_dir RUN` uploads it once the Hub is back."""
    from hbt_accel.config import parse_config
    from hbt_accel.errors import PushFailed
    from hbt_accel.training.run import train
    from tests.test_train import FAST

    out = tmp_path / "run"
    cfg = parse_config(
        [
            *FAST,
            *("--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--train_data", str(mlqa_slice)),
            *("--max_steps", "2", "--per_device_train_batch_size", "8", "--mixed_precision", "no"),
            *("--push_to_hub", "true", "--hub_model_id", "alice/hbt-tiny"),
        ]
    )
    fake_hub.commit_status = 500
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)  # its 5 retries: 23 s
    with pytest.raises(PushFailed) as error:
        train(cfg)
    message = str(error.value)
    assert "\n" not in message and f"uploading {out} to alice/hbt-tiny failed (HTTP 500 from" in message
    assert message.endswith(f"retry the upload alone with: python recipes/push.py --run_dir {out}")
    assert {"model.safetensors", "train_summary.json", "README.md", "hbt_config.yaml"} <= {
        p.name for p in out.iterdir()
    }
    assert fake_hub.commits == []

    fake_hub.commit_status = 200
    push = _recipe_module("push")
    url = push.main(push.PushArguments(run_dir=str(out)).validate())
    (commit,) = fake_hub.commits
    assert url.endswith(f"/alice/hbt-tiny/commit/{1:040x}") and commit["summary"] == "final model"
    assert commit["files"]["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "README.md" in commit["files"] and "train_summary.json" in commit["files"]


def test_push_recipe_refuses_a_folder_that_is_not_a_finished_run(tmp_path):
    from hbt_accel.errors import DataError

    push = _recipe_module("push")
    (tmp_path / "hbt_config.yaml").write_text("max_steps: 2\n")
    with pytest.raises(DataError, match=r"is not a finished run \(no train_summary.json, model.safetensors\)"):
        push.main(push.PushArguments(run_dir=str(tmp_path)))


def _recipe_module(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
