"""Hub ids as checkpoint arguments, end to end: the real huggingface_hub client over HTTP against FakeHub."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from _hub_helpers import READ_TOKEN, FakeHub, fake_hub, go_offline  # noqa: F401 - fake_hub is a fixture

from surgeon.cli.main import cli
from surgeon.errors import CheckpointNotFoundError, HubError, PickleRefusedError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.hub import parse_hub_arg, set_hub_defaults
from surgeon.io.resolve import resolve_path
from surgeon.workflows.convert import convert_checkpoint

CARD = b"---\nlicense: apache-2.0\n---\n# tiny\n"


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def resolved_files(hub: FakeHub) -> set[str]:
    """Files the client downloaded (GET on /resolve/)."""
    return {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.requests("GET", "/resolve/")}


@pytest.fixture(scope="module")
def sharded(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "model"
    convert_checkpoint(tiny_llama, out, max_shard_size="40KB")
    return out


def test_parse_hub_arg() -> None:
    assert parse_hub_arg("org/name") == ("org/name", None)
    assert parse_hub_arg("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    assert parse_hub_arg("org/na.me-2@v1.0") == ("org/na.me-2", "v1.0")
    for not_hub in ("./org/name", "/abs/path", "name", "a/b/c", "org/name@", "org/..", "~/x/y"):
        assert parse_hub_arg(not_hub) is None, not_hub


def test_inspect_hub_model_downloads_only_what_it_needs(fake_hub: FakeHub, tiny_llama: Path) -> None:
    files = folder_files(tiny_llama)
    extras = {"README.md": CARD, "pytorch_model.bin": b"PK\x03\x04 pickle", "training_args.bin": b"pickle",
              "optimizer.pt": b"pickle", "onnx/model.onnx": b"onnx", "checkpoint-10/model.safetensors": b"old",
              "checkpoint-10/config.json": b"{}", "images/plot.png": b"png"}
    fake_hub.add_repo("org/tiny", {**files, **extras})
    result = CliRunner().invoke(cli, ["inspect", "org/tiny", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    with Checkpoint.open(tiny_llama) as local:
        assert report["tensor_count"] == len(local)
    assert resolved_files(fake_hub) == set(files) | {"README.md"}
    assert not [r for r in fake_hub.log if r.path.endswith((".bin", ".pt", ".onnx", ".png"))]


def test_sharded_repo_fetches_only_the_shards_its_index_names(fake_hub: FakeHub, sharded: Path, tmp_path: Path) -> None:
    files = folder_files(sharded)
    assert len([n for n in files if n.endswith(".safetensors")]) > 1
    fake_hub.add_repo("org/sharded", {**files, "consolidated.safetensors": b"a stale single-file copy"})
    local = resolve_path("org/sharded")
    assert resolved_files(fake_hub) == set(files)
    assert folder_files(local) == files  # byte-identical
    with Checkpoint.open(local) as a, Checkpoint.open(sharded) as b:
        assert a.keys() == b.keys()
        assert all(a.read_raw(k) == b.read_raw(k) for k in a.keys())
    assert "snapshots" in local.parts and local.parent.parent.name == "models--org--sharded"


def test_revision_from_at_suffix_keyword_and_cli_default(fake_hub: FakeHub, tiny_llama: Path, tiny_gpt2: Path) -> None:
    first = fake_hub.add_repo("org/evolving", folder_files(tiny_llama))
    fake_hub.add_repo("org/evolving", folder_files(tiny_gpt2), message="swap")
    gpt2_keys = Checkpoint.open(tiny_gpt2).keys()
    llama_keys = Checkpoint.open(tiny_llama).keys()
    assert Checkpoint.open(resolve_path("org/evolving")).keys() == gpt2_keys
    assert Checkpoint.open(resolve_path(f"org/evolving@{first}")).keys() == llama_keys
    assert Checkpoint.open(resolve_path("org/evolving", revision=first)).keys() == llama_keys
    set_hub_defaults(revision=first)
    try:
        assert resolve_path("org/evolving").name == first
        assert resolve_path("org/evolving@main").name == fake_hub.head("org/evolving")  # @rev beats --revision
    finally:
        set_hub_defaults()


def test_bin_only_repo_is_refused_before_any_download(fake_hub: FakeHub) -> None:
    fake_hub.add_repo("org/pickled", {"pytorch_model.bin": b"pickle", "config.json": b"{}"})
    result = CliRunner().invoke(cli, ["inspect", "org/pickled"])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: org/pickled@main: the repo holds only pickle weights (pytorch_model.bin); surgeon never unpickles "
        "and downloaded nothing. Use a revision with .safetensors (the Hub's conversion bot often opens one: "
        "org/pickled@refs/pr/N), or convert with transformers' save_pretrained(..., safe_serialization=True).\n"
    )
    assert fake_hub.requests("GET", "/resolve/") == [] and fake_hub.requests("HEAD") == []
    with pytest.raises(PickleRefusedError):
        resolve_path("org/pickled")


def test_missing_repo_and_private_repo(fake_hub: FakeHub, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add_repo("org/secret", folder_files(tiny_llama), private=True)
    for repo in ("org/absent", "org/secret"):
        result = CliRunner().invoke(cli, ["inspect", repo])
        assert result.exit_code == 1
        assert result.stderr == (
            f"Error: {repo}@main: no such local path, and no such repo on {fake_hub.url}, or it is private and the "
            "token cannot see it; check the path or id, or set HF_TOKEN / pass --token with access.\n"
        )
    assert resolve_path("org/secret", token=READ_TOKEN).is_dir()
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    assert CliRunner().invoke(cli, ["inspect", "org/secret"]).exit_code == 0


def test_unknown_revision(fake_hub: FakeHub, tiny_llama: Path) -> None:
    fake_hub.add_repo("org/tiny", folder_files(tiny_llama))
    with pytest.raises(HubError) as err:
        resolve_path("org/tiny@nope")
    assert str(err.value) == "org/tiny@nope: revision 'nope' does not exist in org/tiny; check the branch, tag or commit."


def test_local_path_wins_and_bad_paths_keep_their_message(fake_hub: FakeHub, tiny_llama: Path,
                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_path("org/name") == Path("org/name")
    with pytest.raises(CheckpointNotFoundError) as err:
        resolve_path("./missing/model")
    assert str(err.value) == "./missing/model: no such file or folder; check the path."
    assert fake_hub.log == []


def test_offline_with_warm_cache_uses_no_network(fake_hub: FakeHub, sharded: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add_repo("org/sharded", folder_files(sharded))
    online = resolve_path("org/sharded")
    seen = len(fake_hub.log)
    go_offline(monkeypatch)
    assert resolve_path("org/sharded") == online
    result = CliRunner().invoke(cli, ["inspect", "org/sharded"])
    assert result.exit_code == 0, result.output
    assert len(fake_hub.log) == seen


def test_offline_with_cold_cache_says_so(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    go_offline(monkeypatch)
    result = CliRunner().invoke(cli, ["inspect", "org/never-fetched"])
    assert result.exit_code == 1
    cache = Path(fake_hub_cache())
    assert result.stderr == (
        f"Error: org/never-fetched@main: not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids "
        "downloading; run once online (unset HF_HUB_OFFLINE) or pass a local folder.\n"
    )
    assert fake_hub.log == []


def fake_hub_cache() -> str:
    import os

    return os.environ["HF_HUB_CACHE"]


def test_429_and_503_are_retried(fake_hub: FakeHub, sharded: Path) -> None:
    files = folder_files(sharded)
    fake_hub.add_repo("org/flaky", files)
    shard = sorted(n for n in files if n.endswith(".safetensors"))[0]
    fake_hub.inject("GET", r"^/api/models/org/flaky/revision/", status=429, times=2)
    fake_hub.inject("GET", r"/tree/", status=503)
    fake_hub.inject("GET", f"/resolve/.*/{shard}$", status=503, times=2)
    local = resolve_path("org/flaky")
    assert folder_files(local) == files
    assert [r.status for r in fake_hub.requests("GET", f"/{shard}")] == [503, 503, 200]


def test_persistent_503_is_reported_clearly(fake_hub: FakeHub, tiny_llama: Path) -> None:
    fake_hub.add_repo("org/down", folder_files(tiny_llama))
    fake_hub.inject("GET", r"^/api/models/org/down", status=503, times=100)
    result = CliRunner().invoke(cli, ["inspect", "org/down"])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: org/down@main: cannot download: Hub server error (503) after 4 attempts; the Hub or HF_ENDPOINT is "
        "having trouble, retry later (https://status.huggingface.co).\n"
    )
    assert len(fake_hub.requests("GET", "/api/models/org/down")) == 4


def test_unreachable_hub(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    result = CliRunner().invoke(cli, ["inspect", "org/tiny"])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: org/tiny@main: cannot reach the Hub at {dead} to download (ConnectError) after 4 attempts; check "
        "the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached files.\n"
    )


def test_rejected_token_is_never_printed(fake_hub: FakeHub, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    fake_hub.add_repo("org/tiny", folder_files(tiny_llama))
    secret = "hf_ThisIsTheUsersSecretToken42"
    monkeypatch.setenv("HF_TOKEN", secret)
    caplog.set_level("DEBUG")
    result = CliRunner().invoke(cli, ["inspect", "org/tiny"])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: org/tiny@main: cannot download: the Hub rejected the token (401 Unauthorized); set HF_TOKEN or pass "
        f"--token with a valid token (create one at {fake_hub.url}/settings/tokens).\n"
    )
    assert secret not in result.output
    assert not [r.name for r in caplog.records if secret in r.getMessage() and not r.name.startswith("httpcore")]


def test_adapter_repo(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "lora")
    files = folder_files(tmp_path / "lora")
    fake_hub.add_repo("org/lora", {**files, "adapter_model.bin": b"pickle", "optimizer.pt": b"pickle"})
    result = CliRunner().invoke(cli, ["inspect", "org/lora", "--json"])
    assert result.exit_code == 0, result.output
    adapter = json.loads(result.stdout)["adapter"]
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
    assert resolved_files(fake_hub) == set(files)
