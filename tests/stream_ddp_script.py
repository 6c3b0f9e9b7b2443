"""Score a streaming pool with ``InfluenceSession`` on one of ``WORLD`` CPU processes (gloo):
``python tests/stream_ddp_script.py OUT_DIR RANK WORLD PORT``. Every rank writes the ids it scored
itself to ``OUT_DIR/rank<RANK>.pt``; rank 0 also writes the gathered result to ``OUT_DIR/result``
and that of a second scoring with ``keep_top_scores=10`` (merged sketches) to ``OUT_DIR/kept``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

import lightning_influence as li  # noqa: E402
from lightning_influence.checkpoint.session import InfluenceSession  # noqa: E402
from tests.callback_models import planted_data  # noqa: E402
from tests.stream_helpers import BlobStream, blob_statistics, trained_blob_model  # noqa: E402


def main(out: Path, rank: int, world: int, port: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = trained_blob_model()
    session = InfluenceSession(li.ClassificationTask(), BlobStream(), Subset(planted_data()[1], range(4)),
                               curvature=dict(correction_batches=3),
                               scoring=dict(top_k=3, batch_size=8, max_train_examples=91))
    streams = []
    make_stream = session.pool_stream
    session.pool_stream = lambda *args, **kwargs: streams.append(make_stream(*args, **kwargs)) or streams[-1]
    result, factors = session.compute(model, blob_statistics(model), step=1)
    scoring = next(s for s in streams if s.limit == 91 and s.wanted is None)  # this rank's share of the pool
    torch.save(torch.tensor(scoring.ids), out / f"rank{rank}.pt")
    session.keep_top_scores = 10  # the same pool again, each process sketching its share
    kept = session.score(model, factors)
    if rank == 0:
        InfluenceSession.write(result, factors, out / "result")
        kept.save(out / "kept")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
