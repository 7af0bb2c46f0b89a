"""Run mergekit 0.1.5 jobs in its own venv (``python _mergekit_driver.py jobs.json``): one process, many jobs.

Job kinds: ``merge`` (a mergekit YAML config written to ``out`` by mergekit's run_merge), ``rescale``
(mergekit's own ``rescaled_masked_tensor`` on given tensors and masks, L1 norm, saved to ``out``) and
``della_probs`` (the keep probabilities mergekit's ``della_magprune`` hands to torch.bernoulli, per tensor).
This file is executed by the mergekit venv's interpreter, never imported by the tests.
"""

import json
import sys

import torch
import yaml
from safetensors.torch import load_file, save_file

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from mergekit.sparsify import RescaleNorm, della_magprune, rescaled_masked_tensor


def della_probs(taus: dict, density: float, epsilon: float) -> dict:
    """mergekit's DELLA keep probabilities: torch.bernoulli replaced by a recorder while della_magprune runs."""
    seen, real = [], torch.bernoulli
    torch.bernoulli = lambda probs, *a, **k: (seen.append(probs.clone()), torch.ones_like(probs))[1]
    try:
        out = {}
        for name, tau in taus.items():
            della_magprune(tau, density, epsilon)
            out[name] = seen.pop().reshape(tau.shape).contiguous()
        return out
    finally:
        torch.bernoulli = real


def main(path: str) -> None:
    for job in json.load(open(path)):
        if job["kind"] == "merge":
            config = MergeConfiguration.model_validate(yaml.safe_load(job["config"]))
            options = MergeOptions(copy_tokenizer=False, write_model_card=False, random_seed=job.get("seed"),
                                   quiet=True)
            run_merge(config, job["out"], options)
        elif job["kind"] == "rescale":
            taus, masks = load_file(job["taus"]), load_file(job["masks"])
            save_file({name: rescaled_masked_tensor(t, masks[name].to(t.dtype), RescaleNorm.l1).contiguous()
                       for name, t in taus.items()}, job["out"])
        elif job["kind"] == "della_probs":
            save_file(della_probs(load_file(job["taus"]), job["density"], job["epsilon"]), job["out"])
        print("done", job["out"], flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
