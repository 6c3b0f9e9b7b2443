"""TEMPORARY stand-ins until helper branches merge (deleted at merge)."""
import hashlib, json
from pathlib import Path
import torch
from lightning_influence._io import META_FILE, atomic_directory, json_bytes, write_file_atomic

FACTORS_DIR = "factors"

def finite_topk(scores, k, largest=True):
    return torch.topk(scores, k, dim=1, largest=largest)

def run_identity(model, task, pool_ids, config=None):
    ids = torch.as_tensor(pool_ids).long().contiguous().numpy().tobytes()
    ident = {"pool_size": len(pool_ids), "pool_fingerprint": hashlib.sha256(ids).hexdigest()[:16],
             "model": type(model).__qualname__, "task": type(task).__name__}
    ident["id"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return ident

def save_result_with_factors(path, result, factors, overwrite=False):
    with atomic_directory(path) as tmp:
        result.write_into(tmp)
        factors.write_into(Path(tmp) / FACTORS_DIR)
    result.path = Path(path)
    return result.path

def update_result_meta(path, **fields):
    meta_path = Path(path) / META_FILE
    payload = json.loads(meta_path.read_text())
    payload["meta"].update(fields)
    write_file_atomic(meta_path, json_bytes(payload))
    return payload["meta"]

def check_schedule(cfg, *, max_epochs, max_steps, saves_checkpoints, total_steps=None, steps_per_epoch=None):
    warnings_out = []
    if cfg.every_n_epochs and max_epochs is not None and cfg.every_n_epochs > max_epochs:
        raise ValueError(f"every_n_epochs={cfg.every_n_epochs} never fires with max_epochs={max_epochs}; "
                         "lower it or set every_n_epochs=None")
    if cfg.every_n_train_steps and max_steps is not None and cfg.every_n_train_steps > max_steps:
        raise ValueError(f"every_n_train_steps={cfg.every_n_train_steps} never fires with max_steps={max_steps}; "
                         "lower it or set every_n_train_steps=None")
    if cfg.collect_every_n_steps > 1 and max_steps is not None and cfg.collect_every_n_steps > max_steps:
        raise ValueError(f"collect_every_n_steps={cfg.collect_every_n_steps} exceeds max_steps={max_steps}: "
                         "only the first step would be collected; lower it")
    if not (cfg.every_n_epochs or cfg.every_n_train_steps or cfg.on_train_end) and not saves_checkpoints:
        raise ValueError("on_checkpoint is the only trigger but the trainer saves no checkpoints "
                         "(no ModelCheckpoint); enable checkpointing or another trigger")
    if cfg.every_n_epochs and cfg.window == "reset" and steps_per_epoch:
        steps = steps_per_epoch * cfg.every_n_epochs
        if steps < cfg.collect_every_n_steps:
            raise ValueError(
                f"collect_every_n_steps={cfg.collect_every_n_steps} is more than the {steps} optimizer steps "
                f"between influence computations (every_n_epochs={cfg.every_n_epochs}): some windows would hold "
                "no statistics; lower collect_every_n_steps")
    if (cfg.every_n_train_steps and not cfg.every_n_epochs and not cfg.on_train_end
            and not (cfg.on_checkpoint and saves_checkpoints) and total_steps is not None
            and cfg.every_n_train_steps > total_steps):
        warnings_out.append(f"every_n_train_steps={cfg.every_n_train_steps} is more than the {total_steps} optimizer "
                            "steps of this run and no other trigger is enabled, so influence will never be "
                            "computed; lower it or set on_train_end=True")
    return warnings_out
