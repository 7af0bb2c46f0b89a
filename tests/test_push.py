"""`surgeon push` and `--push-to`, end to end against FakeHub with the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from _hub_helpers import READ_TOKEN, WRITE_TOKEN, FakeHub, fake_hub, go_offline  # noqa: F401 - fake_hub is a fixture

from surgeon.cli.common import emit_json, global_options, json_option
from surgeon.cli.hub_options import hub_options, push_after, push_to_option
from surgeon.cli.main import SurgeonGroup, cli
from surgeon.io.model_card import render_card, split_front_matter
from surgeon.workflows.convert import convert_checkpoint


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file (recursively) with its size and sha256, to prove the folder was not touched."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def push(*args: str, env: dict[str, str] | None = None) -> click.testing.Result:
    return CliRunner().invoke(cli, ["push", *args], env=env)


@pytest.fixture
def out(tiny_llama: Path, tmp_path: Path) -> Path:
    """A sharded surgeon output folder (convert writes shards, an index and surgeon_provenance.json)."""
    folder = tmp_path / "out"
    convert_checkpoint(tiny_llama, folder, max_shard_size="40KB")
    return folder


@pytest.fixture
def writer(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    return WRITE_TOKEN


@pytest.mark.parametrize("mode", ["regular", "lfs"])
def test_push_roundtrip_byte_identical(fake_hub: FakeHub, out: Path, writer: str, mode: str) -> None:
    fake_hub.upload_mode = mode
    before = snapshot(out)
    result = push(str(out), "tester/tiny", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    head = fake_hub.head("tester/tiny")
    assert report["commit_oid"] == head and report["commit_url"] == f"{fake_hub.url}/tester/tiny/commit/{head}"
    assert report["created_repo"] is True and report["unchanged"] is False
    remote = fake_hub.files("tester/tiny")
    for rel in before:
        assert remote[rel] == (out / rel).read_bytes(), rel
    assert set(remote) == set(before) | {"README.md", ".gitattributes"}
    assert len(fake_hub.history("tester/tiny")) == 2  # the repo's initial commit + ONE commit with everything
    shards = [r for r in remote if r.endswith(".safetensors")]
    assert all(fake_hub.blob("tester/tiny", s).lfs == (mode == "lfs") for s in shards)
    assert bool(fake_hub.requests("PUT", "/__lfs/upload/")) == (mode == "lfs")
    assert snapshot(out) == before  # the local output is only read
    assert writer not in result.output


def test_push_prints_commit_url_and_is_idempotent(fake_hub: FakeHub, out: Path, writer: str) -> None:
    first = push(str(out), "tester/tiny")
    assert first.exit_code == 0, first.output
    head = fake_hub.head("tester/tiny")
    assert first.stdout == f"{fake_hub.url}/tester/tiny/commit/{head}\n"
    assert "created repo tester/tiny" in first.stderr
    again = push(str(out), "tester/tiny", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["unchanged"] is True
    assert fake_hub.head("tester/tiny") == head and len(fake_hub.history("tester/tiny")) == 2


def test_model_card_records_the_surgery(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path, writer: str) -> None:
    files = {p.name: p.read_bytes() for p in tiny_llama.iterdir()}
    base_sha = fake_hub.add_repo("org/base", {**files, "README.md": b"---\nlicense: llama3.2\n---\n# base\n"})
    folder = tmp_path / "converted"
    convert_checkpoint("org/base", folder, dtype="bf16")
    result = push(str(folder), "tester/base-bf16")
    assert result.exit_code == 0, result.output
    meta, body = split_front_matter(fake_hub.files("tester/base-bf16")["README.md"].decode())
    assert meta == {"base_model": "org/base", "base_model_relation": "finetune", "license": "llama3.2",
                    "library_name": "transformers", "tags": ["surgeon", "convert"]}
    assert "`surgeon convert`" in body
    assert "| dtype | BF16 |" in body
    assert f"| source | [org/base]({fake_hub.url}/org/base) | main | `{base_sha}` |" in body


def test_existing_card_is_updated_not_replaced(fake_hub: FakeHub, out: Path, writer: str) -> None:
    fake_hub.add_repo("tester/tiny", {"README.md": b"---\nlicense: mit\ntags:\n- mine\n---\n# My notes\n\nKeep me.\n"})
    assert push(str(out), "tester/tiny").exit_code == 0
    assert push(str(out), "tester/tiny", "--commit-message", "again").exit_code == 0  # no second section
    card = fake_hub.files("tester/tiny")["README.md"].decode()
    meta, body = split_front_matter(card)
    assert meta["license"] == "mit" and meta["tags"] == ["mine", "surgeon", "convert"]
    assert body.lstrip("\n").startswith("# My notes\n\nKeep me.\n\n<!-- surgeon:begin -->\n## Surgery")
    assert body.count("<!-- surgeon:begin -->") == 1


def test_branch_and_pull_request(fake_hub: FakeHub, out: Path, writer: str) -> None:
    fake_hub.add_repo("tester/tiny", {"config.json": b"{}"})
    main = fake_hub.head("tester/tiny")
    assert push(str(out), "tester/tiny", "--revision", "dev").exit_code == 0
    assert fake_hub.head("tester/tiny") == main
    assert "model.safetensors.index.json" in fake_hub.files("tester/tiny", "dev")
    result = push(str(out), "tester/tiny", "--create-pr")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{fake_hub.url}/tester/tiny/discussions/1\n"
    assert fake_hub.head("tester/tiny") == main
    assert "model.safetensors.index.json" in fake_hub.files("tester/tiny", "refs/pr/1")


def test_lost_commit_response_does_not_commit_twice(fake_hub: FakeHub, out: Path, writer: str) -> None:
    fake_hub.inject("POST", r"/commit/main$", drop=True, after=True)  # the commit lands, the answer is lost
    result = push(str(out), "tester/tiny", "--json")
    assert result.exit_code == 0, result.output
    assert len(fake_hub.history("tester/tiny")) == 2
    assert json.loads(result.stdout)["commit_oid"] == fake_hub.head("tester/tiny")
    assert [r.status for r in fake_hub.requests("POST", "/commit/")] == [-1, 412]


def test_429_and_503_are_survived(fake_hub: FakeHub, out: Path, writer: str) -> None:
    fake_hub.upload_mode = "lfs"
    fake_hub.inject("POST", r"^/api/repos/create$", status=429)
    fake_hub.inject("POST", r"/preupload/", status=503)
    fake_hub.inject("PUT", r"^/__lfs/upload/", status=503)
    fake_hub.inject("POST", r"/commit/main$", status=503, times=2)
    before = snapshot(out)
    result = push(str(out), "tester/tiny")
    assert result.exit_code == 0, result.output
    remote = fake_hub.files("tester/tiny")
    assert all(remote[rel] == (out / rel).read_bytes() for rel in before)
    assert len(fake_hub.history("tester/tiny")) == 2


@pytest.mark.parametrize(("status", "headers", "fix"), [
    (401, {"X-Error-Message": "Invalid credentials in Authorization header"},
     "the Hub rejected the token (401 Unauthorized); set HF_TOKEN or pass --token with a valid token "
     "(create one at {url}/settings/tokens)."),
    (403, {}, "the token is not allowed to do this (403 Forbidden); use a token with write access to this repo or "
              "its organization (fine-grained tokens need 'write' on it)."),
    (404, {}, "not found (404); check the repo id and revision."),
    (409, {}, "conflict (409): the repo name is taken or another operation on it is running; wait and retry, or "
              "choose another repo id."),
    (412, {}, "the branch moved while pushing (412 Precondition Failed): someone else committed; nothing was "
              "committed by this push. Re-run surgeon push to push on top of the new head."),
    (413, {}, "the Hub refused a request as too large (413 Payload Too Large); large files must go through LFS: "
              "check that huggingface_hub is up to date and that .gitattributes tracks *.safetensors with LFS."),
    (429, {}, "rate limited by the Hub (429 Too Many Requests) after 4 attempts; wait a few minutes and re-run."),
    (503, {}, "Hub server error (503) after 4 attempts; the Hub or HF_ENDPOINT is having trouble, retry later "
              "(https://status.huggingface.co)."),
])
def test_commit_failures_are_one_line_and_leave_the_output_alone(
        fake_hub: FakeHub, out: Path, writer: str, status: int, headers: dict[str, str], fix: str) -> None:
    fake_hub.inject("POST", r"/commit/main$", status=status, times=100, headers=headers)
    before = snapshot(out)
    result = push(str(out), "tester/tiny")
    assert result.exit_code == 1
    assert result.stderr == f"Error: tester/tiny@main: cannot push: {fix.format(url=fake_hub.url)}\n"
    assert result.stdout == ""
    assert snapshot(out) == before
    assert len(fake_hub.history("tester/tiny")) == 1  # nothing committed
    attempts = len(fake_hub.requests("POST", "/commit/"))
    assert attempts == (4 if status in (429, 503) else 1)


def test_dropped_connections_are_reported_as_network_errors(fake_hub: FakeHub, out: Path, writer: str) -> None:
    fake_hub.inject("POST", r"/commit/main$", drop=True, times=100)
    before = snapshot(out)
    result = push(str(out), "tester/tiny")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: tester/tiny@main: cannot reach the Hub at {fake_hub.url} to push (RemoteProtocolError) after 4 "
        "attempts; check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached files.\n"
    )
    assert snapshot(out) == before and len(fake_hub.history("tester/tiny")) == 1


def test_concurrent_commit_gives_412(fake_hub: FakeHub, out: Path, writer: str) -> None:
    fake_hub.add_repo("tester/tiny", {"config.json": b"{}"})
    fake_hub.inject("POST", r"/commit/main$", run=lambda: fake_hub.add_repo("tester/tiny", {"other.json": b"[]"}))
    result = push(str(out), "tester/tiny")
    assert result.exit_code == 1
    assert "(412 Precondition Failed)" in result.stderr
    assert "other.json" in fake_hub.files("tester/tiny") and "README.md" not in fake_hub.files("tester/tiny")


def test_token_is_never_printed(fake_hub: FakeHub, out: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "hf_SecretThatMustNeverBePrinted99"
    caplog.set_level("DEBUG")
    bad = push(str(out), "tester/tiny", "--token", secret)
    assert bad.exit_code == 1 and "the Hub rejected the token (401 Unauthorized)" in bad.stderr
    fake_hub.tokens[secret] = ("tester", "write")
    ok = push(str(out), "tester/tiny", "--token", secret, "--json")
    assert ok.exit_code == 0, ok.output
    fake_hub.inject("POST", r"/commit/main$", status=500, times=100, headers={"X-Error-Message": f"boom {secret}"})
    failed = push(str(out), "tester/other", "--token", secret)
    assert failed.exit_code == 1
    for result in (bad, ok, failed):
        assert secret not in result.output
    # httpcore's DEBUG trace shows the raw response headers, where this fake server echoes the token on purpose;
    # nothing that surgeon or huggingface_hub logs may contain it.
    assert not [r.name for r in caplog.records if secret in r.getMessage() and not r.name.startswith("httpcore")]


def test_read_only_token_and_missing_token(fake_hub: FakeHub, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = push(str(out), "tester/tiny")
    assert result.exit_code == 1
    assert result.stderr == ("Error: tester/tiny: pushing needs a Hub token with write access; set HF_TOKEN, pass "
                             "--token, or run `hf auth login`.\n")
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    result = push(str(out), "tester/tiny")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: tester/tiny@main: cannot push: the token is not allowed to do this (403")
    assert "tester/tiny" not in fake_hub.repos


def test_offline_and_bad_repo_id(fake_hub: FakeHub, out: Path, writer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = push(str(out), "not a repo")
    assert bad.exit_code == 1
    assert bad.stderr == ("Error: 'not a repo' is not a Hub repo id to push to; write it as org/name (letters, digits, "
                          "'-', '_', '.'), with the branch in --revision.\n")
    go_offline(monkeypatch)
    off = push(str(out), "tester/tiny")
    assert off.stderr == "Error: tester/tiny: cannot push while HF_HUB_OFFLINE=1; unset it to publish.\n"
    assert fake_hub.log == []


def test_folder_is_validated_before_anything_is_sent(fake_hub: FakeHub, out: Path, writer: str) -> None:
    shard = sorted(out.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    result = push(str(out), "tester/tiny")
    assert result.exit_code == 1
    assert "the file is truncated. Download it again." in result.stderr
    shard.write_bytes(data)
    (out / "extra.safetensors").write_bytes((out / shard.name).read_bytes())
    result = push(str(out), "tester/tiny")
    assert result.stderr == (f"Error: {out}: extra.safetensors is not part of the checkpoint (the index does not name "
                             "it); it would be published as a stray file. Delete it or fix the index.\n")
    (out / "extra.safetensors").unlink()
    (out / "optimizer.pt").write_bytes(b"pickle")
    result = push(str(out), "tester/tiny")
    assert result.stderr.startswith(f"Error: {out / 'optimizer.pt'}: pickle weights are never published by surgeon")
    result = push(str(shard), "tester/tiny")
    assert result.stderr == (f"Error: {shard}: surgeon push publishes a folder, not a file; write the output with "
                             "-o FOLDER and push that.\n")
    assert fake_hub.log == []


# -- --push-to, wired the way merge / apply / scale-intruders wire it --------------------------

@click.command("convert-and-push")
@click.argument("source")
@click.option("-o", "--output", required=True)
@hub_options
@push_to_option
@json_option
@global_options
def convert_and_push(source: str, output: str, push_to: str | None, private: bool, as_json: bool) -> None:
    """Test command: a workflow, then push_after."""
    report = convert_checkpoint(source, output, dtype="bf16")
    pushed = push_after(output, push_to, private=private, as_json=as_json)
    if as_json:
        emit_json("convert-and-push", {**report.to_dict(), "push": pushed.to_dict() if pushed else None})


class _Group(SurgeonGroup):
    """The real command group (SurgeonError -> `Error: ...`, exit 1) holding only the test command."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return ["convert-and-push"]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return convert_and_push if cmd_name == "convert-and-push" else None


def convert_then_push(*args: str, env: dict[str, str] | None = None) -> click.testing.Result:
    return CliRunner().invoke(_Group("surgeon"), ["convert-and-push", *args], env=env)


def test_push_to_pushes_after_the_output_is_written(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path) -> None:
    files = {p.name: p.read_bytes() for p in tiny_llama.iterdir()}
    fake_hub.add_repo("org/secret-base", files, private=True)
    out = tmp_path / "bf16"
    args = ["org/secret-base", "-o", str(out), "--push-to", "tester/bf16", "--private", "--token", WRITE_TOKEN, "--json"]
    result = convert_then_push(*args)
    assert result.exit_code == 0, result.output
    pushed = json.loads(result.stdout)["push"]
    assert pushed["commit_oid"] == fake_hub.head("tester/bf16") and fake_hub.repos["tester/bf16"].private
    assert fake_hub.files("tester/bf16")["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert WRITE_TOKEN not in result.output


def test_push_to_checks_the_token_before_any_work(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    result = convert_then_push(str(tiny_llama), "-o", str(out), "--push-to", "tester/bf16")
    assert result.exit_code == 1
    assert "pushing needs a Hub token with write access" in result.output
    assert not out.exists()
    result = convert_then_push(str(tiny_llama), "-o", str(out), "--push-to", "tester/bf16",
                               "--token", "hf_NotAValidTokenAtAll")
    assert result.exit_code == 1 and "401 Unauthorized" in result.output and not out.exists()
    assert "hf_NotAValidTokenAtAll" not in result.output


def test_failed_push_to_keeps_the_output(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path, writer: str) -> None:
    out = tmp_path / "bf16"
    fake_hub.inject("POST", r"/commit/main$", status=503, times=100)
    result = convert_then_push(str(tiny_llama), "-o", str(out), "--push-to", "tester/bf16")
    assert result.exit_code == 1
    assert result.output == (
        "Error: tester/bf16@main: cannot push: Hub server error (503) after 4 attempts; the Hub or HF_ENDPOINT is "
        "having trouble, retry later (https://status.huggingface.co). The output "
        f"{out} was written and is intact; push it again with `surgeon push {out} tester/bf16`.\n"
    )
    before = snapshot(out)
    assert (out / "model.safetensors").is_file()
    fake_hub.faults.clear()
    assert push(str(out), "tester/bf16").exit_code == 0
    assert snapshot(out) == before


def test_hub_options_revision_and_token_reach_the_download(fake_hub: FakeHub, tiny_llama: Path, tiny_gpt2: Path,
                                                           tmp_path: Path) -> None:
    first = fake_hub.add_repo("org/evolving", {p.name: p.read_bytes() for p in tiny_llama.iterdir()}, private=True)
    fake_hub.add_repo("org/evolving", {p.name: p.read_bytes() for p in tiny_gpt2.iterdir()}, message="swap")
    out = tmp_path / "old"
    result = convert_then_push("org/evolving", "-o", str(out), "--revision", first, "--token", READ_TOKEN)
    assert result.exit_code == 0, result.output
    provenance = json.loads((out / "surgeon_provenance.json").read_text())
    assert provenance["inputs"] == {"source": "org/evolving"}
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    card = render_card(out, repo_id="me/old")
    assert f"| source | [org/evolving]({fake_hub.url}/org/evolving) | {first} | `{first}` |" in card
    denied = convert_then_push("org/evolving", "-o", str(tmp_path / "denied"))  # the token does not leak across runs
    assert denied.exit_code == 1 and "it is private and the token cannot see it" in denied.output
