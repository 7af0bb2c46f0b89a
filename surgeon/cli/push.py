"""`surgeon push DIR REPO_ID`."""

from __future__ import annotations

import click

from surgeon.cli.common import emit_json, global_options, human_bytes, info, json_option
from surgeon.workflows.publish.push import push_folder


@click.command("push")
@click.argument("folder", metavar="DIR")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private (a repo that exists keeps its visibility).")
@click.option("--revision", metavar="BRANCH", default=None, help="Branch to commit to; created from main if missing. [default: main]")
@click.option("--create-pr", is_flag=True, help="Open a pull request with the files instead of committing to the branch.")
@click.option("--base-model", metavar="REPO_ID", default=None,
              help="The Hub model the card names as base_model (with base_model_relation) when DIR's provenance "
                   "records none. [default: config.json's _name_or_path when that is a repo id]")
@click.option("--commit-message", metavar="TEXT", default=None, help="Commit title. [default: 'Upload surgeon <command> output']")
@click.option("--token", metavar="TOKEN", default=None,
              help="Hub token with write access. [default: HF_TOKEN, else the `hf auth login` token] Never printed.")
@json_option
@global_options
def command(folder: str, repo_id: str, private: bool, revision: str | None, create_pr: bool, base_model: str | None,
            commit_message: str | None, token: str | None, as_json: bool) -> None:
    """Publish a surgeon output folder to the Hugging Face Hub in one commit.

    Before anything is sent, DIR is validated: every shard header and the
    index are re-checked and every byte is read. The repo (and branch) is
    created if needed, README.md gets a model card that records the surgery
    (base model, command, parameters, inputs with revisions), and all files go
    up in ONE commit on top of the branch head seen at the start, so a retried
    push can never commit twice. Prints the commit URL (or the PR URL).
    DIR itself is never modified. HF_ENDPOINT picks another Hub.

    \b
    Example:
      surgeon push ./llama-repaired me/llama-repaired --private
      surgeon push ./merged org/model --revision v2 --create-pr --json
      surgeon push ./my-finetune me/my-finetune --base-model meta-llama/Llama-3.2-1B
    """
    report = push_folder(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                         commit_message=commit_message, token=token, base_model=base_model)
    if as_json:
        emit_json("push", report.to_dict())
        return
    if report.created_repo:
        info(f"created {'private ' if private else ''}repo {report.repo_id}")
    elif private:
        info(f"{report.repo_id} already exists; --private applies to new repos only, its visibility is unchanged")
    if report.unchanged:
        info(f"{report.repo_id}@{report.revision} already holds these files; nothing to commit")
    else:
        info(f"pushed {len(report.files)} files ({human_bytes(report.bytes)}) to {report.repo_id}@{report.revision}")
    click.echo(report.pr_url or report.commit_url)
