"""vlm_rl.hub over real HTTP: the real huggingface_hub client against LocalHub on 127.0.0.1.

Every test runs with huggingface.co unreachable by construction: HF_ENDPOINT points at LocalHub,
the hub cache and login live under tmp_path, and any name lookup other than the loopback address
fails the test (see `loopback_only`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from hub_server import LocalHub
from huggingface_hub import constants, set_client_factory
from huggingface_hub.utils import httpx
from huggingface_hub.utils._http import default_client_factory

from vlm_rl.hub import HubError, download, push_folder, write_model_card

# LocalHub warns, as the Hub does, when a pushed README.md has no YAML metadata (a run folder's own notes).
pytestmark = pytest.mark.filterwarnings("ignore:Warnings while validating metadata in README.md")

TOKEN = "hf_vlmrlTestToken0123456789abcdef"
REPO = "tester/tiny-policy"
SAFETENSORS_LIKE = b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"w":{"dtype":"F32"}}' + bytes(range(256)) * 40


def card_args(**overrides) -> dict:
    card = dict(
        kind="policy",
        base_model="Qwen/Qwen2.5-VL-3B-Instruct",
        datasets=["easy-vqa"],
        algorithm="grpo",
        hyperparameters={"learning_rate": 1e-4, "num_generations": 8, "beta": 0.0},
        reward_components={"color": 0.5, "shape": 0.5},
        metrics={"eval/accuracy": 0.82, "train/reward": 0.91},
    )
    return {**card, **overrides}


def digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def front_matter(readme: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
    assert match, "the model card must open with YAML front matter"
    return yaml.safe_load(match.group(1))


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[str]]:
    """Isolate huggingface_hub (cache, login, offline flag) and refuse any non-loopback host."""
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    # huggingface_hub reads these once, at import: patch the values it actually uses.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets offline mode for everything else
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))

    refused: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if str(host) not in ("127.0.0.1", "localhost", "::1"):
            refused.append(str(host))
            raise OSError(f"test_hub: network access to {host} is not allowed")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield refused
    assert refused == [], f"something tried to reach {refused}"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    with LocalHub(token=TOKEN) as local_hub:
        monkeypatch.setenv("HF_ENDPOINT", local_hub.endpoint)
        yield local_hub


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A run folder as a trainer leaves it: configs, binary weights, a subfolder, its own README."""
    folder = tmp_path / "run"
    (folder / "logs").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}\n')
    (folder / "adapter_model.safetensors").write_bytes(SAFETENSORS_LIKE)
    (folder / "logs" / "metrics.jsonl").write_text('{"step": 1, "train/reward": 0.5}\n')
    (folder / "README.md").write_text("# my notes, not a model card\n")
    return folder


# -- push -------------------------------------------------------------------------------------
def test_push_uploads_every_file_byte_for_byte_and_adds_a_model_card(hub: LocalHub, run_folder: Path):
    before = digest(run_folder)

    commit_url = push_folder(
        run_folder, REPO, token=TOKEN, private=True, commit_message="GRPO run 7", card=card_args()
    )

    pushed = hub.files(REPO)
    assert set(pushed) == set(before) | {".gitattributes"}  # .gitattributes: the repo's initial commit
    for name in before.keys() - {"README.md"}:
        assert pushed[name] == (run_folder / name).read_bytes()
    assert commit_url == f"{hub.endpoint}/{REPO}/commit/{hub.repo(REPO).branches['main']}"
    assert [(c.summary, c.branch) for c in hub.commits] == [("GRPO run 7", "main")]
    assert hub.repo(REPO).private is True

    readme = pushed["README.md"].decode()
    meta = front_matter(readme)
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert meta["datasets"] == ["easy-vqa"]
    assert meta["tags"] == ["vlm-rl", "reinforcement-learning", "vision-language-model", "lora", "grpo"]
    for section in (
        "## Summary",
        "## Training",
        "### Reward components",
        "## Final metrics",
        "## How to load",
    ):
        assert section in readme
    assert "| `learning_rate` | 0.0001 |" in readme
    assert "| `color` | 0.5 |" in readme
    assert "| `eval/accuracy` | 0.82 |" in readme
    assert (
        f'PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained("{meta["base_model"]}"), "{REPO}")'
        in readme
    )
    assert readme in hub.validated_yaml  # the client validated exactly what was pushed

    assert digest(run_folder) == before  # the card went into a temporary copy


def test_push_without_card_uploads_the_folder_as_is(hub: LocalHub, run_folder: Path):
    with pytest.warns(UserWarning, match="empty or missing yaml metadata"):  # the client validated it
        push_folder(run_folder, REPO, token=TOKEN)

    pushed = hub.files(REPO)
    assert pushed["README.md"] == b"# my notes, not a model card\n"
    assert hub.repo(REPO).private is False
    assert hub.commits[0].summary == "Upload run with vlm_rl"


def test_push_to_a_branch_creates_it_once_and_leaves_main_alone(hub: LocalHub, run_folder: Path):
    push_folder(run_folder, REPO, token=TOKEN, revision="experiment", commit_message="first")
    (run_folder / "adapter_config.json").write_text('{"r": 16}\n')
    push_folder(run_folder, REPO, token=TOKEN, revision="experiment", commit_message="second")

    assert set(hub.files(REPO)) == {".gitattributes"}
    assert hub.files(REPO, "experiment")["adapter_config.json"] == b'{"r": 16}\n'
    assert [(c.summary, c.branch) for c in hub.commits] == [("first", "experiment"), ("second", "experiment")]
    assert hub.commits[1].paths == ("adapter_config.json",)  # unchanged files are not re-sent
    branch_calls = [r for r in hub.requests if r.path == f"/api/models/{REPO}/branch/experiment"]
    assert len(branch_calls) == 2  # the second answered 409 "exists", which is fine


def test_download_returns_the_pushed_bytes(hub: LocalHub, run_folder: Path):
    push_folder(run_folder, REPO, token=TOKEN, card=card_args())
    push_folder(run_folder, REPO, token=TOKEN, revision="v2", card=card_args(algorithm="rloo"))

    main = download(REPO, token=TOKEN)
    v2 = download(REPO, token=TOKEN, revision="v2")

    for snapshot, revision in ((main, "main"), (v2, "v2")):
        assert digest(snapshot) == {
            name: hashlib.sha256(content).hexdigest() for name, content in hub.files(REPO, revision).items()
        }
        assert (snapshot / "adapter_model.safetensors").read_bytes() == SAFETENSORS_LIKE
    assert "rloo" in front_matter((v2 / "README.md").read_text())["tags"]
    assert "rloo" not in front_matter((main / "README.md").read_text())["tags"]


def test_explicit_endpoint_overrides_hf_endpoint(run_folder: Path, monkeypatch: pytest.MonkeyPatch):
    with LocalHub() as default_hub, LocalHub() as self_hosted:
        monkeypatch.setenv("HF_ENDPOINT", default_hub.endpoint)

        push_folder(run_folder, REPO, token=TOKEN, endpoint=self_hosted.endpoint)
        path = download(REPO, endpoint=self_hosted.endpoint)

        assert default_hub.requests == []
        assert (path / "adapter_model.safetensors").read_bytes() == SAFETENSORS_LIKE


# -- the token --------------------------------------------------------------------------------
def test_token_reaches_the_server_but_no_file_and_no_log(
    hub: LocalHub, run_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
):
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub then logs every request as curl
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    hyperparameters = {"learning_rate": 1e-4, "hub_token": "hf_someOtherSecret"}

    push_folder(run_folder, REPO, token=TOKEN, card=card_args(hyperparameters=hyperparameters))
    snapshot = download(REPO, token=TOKEN)

    assert hub.authorizations() == {f"Bearer {TOKEN}"}
    needle = TOKEN.encode()
    for name, content in hub.files(REPO).items():
        assert needle not in content, f"token pushed in {name}"
    for path in [*tmp_path.rglob("*")]:  # the run folder, the hub cache, the login folder
        if path.is_file():
            assert needle not in path.read_bytes(), f"token written to {path}"
    assert any("pushing" in record.getMessage() for record in caplog.records)
    assert any("/commit/main" in record.getMessage() for record in caplog.records)
    assert TOKEN not in caplog.text
    readme = (snapshot / "README.md").read_text()
    assert "hf_someOtherSecret" not in readme and "| `hub_token` | <redacted> |" in readme


def test_token_comes_from_the_argument_then_hf_token_then_the_login(
    run_folder: Path, monkeypatch, tmp_path: Path
):
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text("hf_fromLogin")
    with LocalHub() as hub:
        push_folder(run_folder, "tester/a", endpoint=hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_fromEnv")
        push_folder(run_folder, "tester/b", endpoint=hub.endpoint)
        push_folder(run_folder, "tester/c", endpoint=hub.endpoint, token="hf_fromArgument")

    by_repo = {r.path: r.authorization for r in hub.requests if r.path.endswith("/commit/main")}
    assert by_repo == {
        "/api/models/tester/a/commit/main": "Bearer hf_fromLogin",
        "/api/models/tester/b/commit/main": "Bearer hf_fromEnv",
        "/api/models/tester/c/commit/main": "Bearer hf_fromArgument",
    }


def test_push_refuses_a_folder_that_contains_the_token(hub: LocalHub, run_folder: Path):
    (run_folder / "training_args.json").write_text(f'{{"push_to_hub": true, "hub_token": "{TOKEN}"}}')
    before = digest(run_folder)

    with pytest.raises(HubError, match=r"training_args\.json contain\(s\) your Hugging Face token") as raised:
        push_folder(run_folder, REPO, token=TOKEN, card=card_args())

    assert TOKEN not in str(raised.value)
    assert hub.requests == []  # refused before any request
    assert digest(run_folder) == before


# -- failures ---------------------------------------------------------------------------------
def closed_port_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


FAILURES = {
    # name: (LocalHub options or None for a closed port, token sent, expected text in the message)
    "401-wrong-token": (
        dict(token=TOKEN),
        "hf_wrongToken",
        r"authentication failed \(401.*check HF_TOKEN / `hf auth login`",
    ),
    "401-no-token": (dict(token=TOKEN), None, r"no token was sent \(401\).*check HF_TOKEN / `hf auth login`"),
    "403": (dict(fail_with=403), TOKEN, r"permission denied \(403.*write access to 'tester'"),
    "404": (dict(fail_with=404), TOKEN, r"not found \(404.*check the repo id"),
    "500": (dict(fail_with=500), TOKEN, r"server error \(500.*retry later"),
    "connection-refused": (None, TOKEN, r"could not connect \(ConnectError.*HF_ENDPOINT or endpoint="),
}


@pytest.mark.parametrize("name", list(FAILURES))
def test_push_failure_raises_a_clear_hub_error_and_keeps_the_folder(name: str, run_folder: Path):
    options, token, expected = FAILURES[name]
    before = digest(run_folder)
    with LocalHub(**options) if options is not None else nullcontext() as local_hub:
        endpoint = local_hub.endpoint if local_hub else closed_port_endpoint()
        with pytest.raises(HubError) as raised:
            push_folder(run_folder, REPO, token=token, endpoint=endpoint, card=card_args())

    message = str(raised.value)
    assert re.search(expected, message), message
    assert f"creating the repo '{REPO}' at {endpoint} failed" in message
    assert f"The local folder {run_folder} was left intact." in message
    assert raised.value.__cause__ is not None
    assert TOKEN not in message
    assert digest(run_folder) == before


@pytest.mark.parametrize("name", ["401-wrong-token", "404", "500", "connection-refused"])
def test_download_failure_raises_a_clear_hub_error(name: str):
    options, token, expected = FAILURES[name]
    with LocalHub(**options) if options is not None else nullcontext() as local_hub:
        endpoint = local_hub.endpoint if local_hub else closed_port_endpoint()
        with pytest.raises(HubError) as raised:
            download(REPO, token=token, endpoint=endpoint, revision="v1")

    message = str(raised.value)
    assert re.search(expected, message), message
    assert f"downloading '{REPO}' at {endpoint} failed" in message
    assert raised.value.__cause__ is not None


def test_download_of_a_missing_repo_says_not_found(hub: LocalHub):
    with pytest.raises(HubError, match=r"downloading 'tester/nope' at .* not found \(404"):
        download("tester/nope", token=TOKEN)


def test_a_hub_that_never_answers_times_out_with_a_hub_error(run_folder: Path):
    def impatient_client() -> httpx.Client:
        client = default_client_factory()
        client.timeout = httpx.Timeout(0.3)
        return client

    set_client_factory(impatient_client)
    try:
        with LocalHub(delay_s=2.0) as slow_hub, pytest.raises(HubError) as raised:
            push_folder(run_folder, REPO, token=TOKEN, endpoint=slow_hub.endpoint)
    finally:
        set_client_factory(default_client_factory)
    assert "did not answer in time (ReadTimeout)" in str(raised.value)


def test_offline_mode_is_named_in_the_error(hub: LocalHub, run_folder: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="offline mode is on.*unset HF_HUB_OFFLINE"):
        push_folder(run_folder, REPO, token=TOKEN)
    assert hub.requests == []


# -- model card -------------------------------------------------------------------------------
def test_reward_model_card_loads_with_vlm_rl(tmp_path: Path):
    path = write_model_card(
        tmp_path,
        kind="reward_model",
        base_model="tiny-llava",
        datasets=["easy-vqa:caption_preference"],
        algorithm=None,
        hyperparameters={"lora_r": 16},
        reward_components=None,
        metrics={"eval/pair_accuracy": 0.97},
        repo_id="tester/caption-rm",
    )

    readme = path.read_text()
    meta = front_matter(readme)
    assert meta["library_name"] == "vlm_rl"
    assert "base_model" not in meta  # "tiny-llava" is not a hub id: the hub would reject it
    assert "`tiny-llava`" in readme
    assert meta["tags"] == [
        "vlm-rl",
        "reinforcement-learning",
        "vision-language-model",
        "lora",
        "reward-model",
    ]
    assert 'rm = RewardModel.from_pretrained("tester/caption-rm")' in readme
    assert "### Reward components" not in readme
    snippet = readme.split("```python\n")[1].split("```")[0]
    assert len(snippet.splitlines()) == 5


def test_model_card_rejects_an_unknown_kind(tmp_path: Path):
    with pytest.raises(ValueError, match="kind must be"):
        write_model_card(tmp_path, repo_id=REPO, **card_args(kind="critic"))


# -- a real LoRA adapter ----------------------------------------------------------------------
def test_peft_lora_adapter_round_trip_gives_identical_logits(hub: LocalHub, tmp_path: Path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    torch.manual_seed(0)
    policy = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)  # fresh LoRA is a no-op (B = 0): make it matter
    policy.eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = policy(input_ids=input_ids).logits
        with policy.disable_adapter():
            base_logits = policy(input_ids=input_ids).logits
    assert not torch.allclose(expected, base_logits)
    adapter_dir = tmp_path / "adapter"
    policy.save_pretrained(adapter_dir)

    push_folder(adapter_dir, "tester/tiny-lora", token=TOKEN, card=card_args())
    downloaded = download("tester/tiny-lora", token=TOKEN)

    torch.manual_seed(0)
    fresh_base = LlamaForCausalLM(config)
    loaded = PeftModel.from_pretrained(fresh_base, downloaded).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, expected)


def test_the_policy_cards_how_to_load_snippet_runs(
    hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Push a LoRA policy on the tiny default VLM, then run the card's snippet as a reader would."""
    from vlm_rl.models import load_model, wrap_with_lora

    # The reader's transformers/peft resolve repo ids with the reader's login and the endpoint
    # huggingface_hub read at import (HF_ENDPOINT set before Python started): patch all three places.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.endpoint)  # file_exists & co.
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    model, processor = load_model("tiny-llava")
    policy = wrap_with_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    policy.eval()
    policy.save_pretrained(tmp_path / "policy")
    push_folder(
        tmp_path / "policy", "tester/tiny-llava-grpo", token=TOKEN, card=card_args(base_model="tiny-llava")
    )

    readme = hub.files("tester/tiny-llava-grpo")["README.md"].decode()
    snippet = readme.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(snippet, namespace)

    input_ids = processor.tokenizer(["describe the shape ."], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(
            namespace["model"].eval()(input_ids=input_ids).logits, policy(input_ids=input_ids).logits
        )
