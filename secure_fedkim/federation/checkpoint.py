"""Checkpoints of a long-lived federation: the global model after each round, so a restarted server resumes.

Files in the run directory (`RunDir.checkpoint`, `.checkpoint_meta`, `.checkpoint_fm`): the global client
model after the round, its metadata ({"round", "run_id", "sha256" of the weights file}) and, with injection
enabled, the foundation model's trainable parameters, with its sampler state in the metadata. The
metadata file is written last, so a crash mid-write leaves the previous checkpoint in force.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

from flwr.app import ArrayRecord

from secure_fedkim.rundir.layout import RunDir


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord, injector=None) -> None:
    """The global model (and the injected FM's trainable state) after `server_round`."""
    from safetensors.torch import save_file

    files = RunDir(run_dir)
    state = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
    _atomic_write(files.checkpoint, lambda p: save_file(state, str(p)))
    meta = {"round": server_round, "run_id": files.name, "sha256": _sha256(files.checkpoint)}
    if injector is not None:
        fm = {n: p.detach().contiguous() for n, p in injector.fm.named_parameters() if p.requires_grad}
        _atomic_write(files.checkpoint_fm, lambda p: save_file(fm, str(p)))
        sampler = injector.sampler_state()
        meta.update(fm_sha256=_sha256(files.checkpoint_fm), fm_rng=sampler["rng"],
                    fm_trained_examples=sampler["trained_examples"])
    _atomic_write(files.checkpoint_meta, lambda p: p.write_text(json.dumps(meta, indent=2)))


def load_checkpoint(run_dir: Path, template: dict) -> tuple[int, ArrayRecord, dict] | None:
    """(round, global arrays in `template`'s order, metadata) of the last checkpoint, or None."""
    from safetensors.torch import load_file

    files = RunDir(run_dir)
    meta_path = files.checkpoint_meta
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if _sha256(files.checkpoint) != meta["sha256"]:
        raise RuntimeError(f"{files.checkpoint}: does not match {meta_path.name} (sha256); not resuming from it")
    state = load_file(str(files.checkpoint))
    if set(state) != set(template):
        raise RuntimeError(f"{files.checkpoint}: its tensors do not match this config's model")
    ordered = OrderedDict((k, state[k]) for k in template)
    return int(meta["round"]), ArrayRecord(ordered), meta


def restore_injector(run_dir: Path, injector, meta: dict) -> None:
    """Put the checkpointed foundation-model parameters and sampler state back into `injector`."""
    import torch
    from safetensors.torch import load_file

    files = RunDir(run_dir)
    path = files.checkpoint_fm
    if _sha256(path) != meta.get("fm_sha256"):
        raise RuntimeError(f"{path}: does not match {files.checkpoint_meta.name}; not resuming from it")
    saved = load_file(str(path))
    with torch.no_grad():
        for n, p in injector.fm.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    injector.restore_sampler_state({"rng": meta["fm_rng"], "trained_examples": meta["fm_trained_examples"]})
