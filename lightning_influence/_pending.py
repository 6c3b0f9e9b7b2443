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
