"""Tokens stage (Ray shell): `data/` -> `tokens/`, the corpus tokenised once with the proxy tokenizer.

Ray Data streams `data/` through `tokenized.tokenize_rows` (plain tasks, one tokenizer per worker process) and the
workers write `tokens/` Parquet straight to the run directory. One Ray task then checks that `tokens/` holds every
`data/` id exactly once and counts rows and tokens. The ensemble and the extraction read `tokens/`; neither
tokenises again.
"""

from __future__ import annotations

import numpy as np

from gradfilter_ray.config import Config
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import IO_REMOTE_ARGS, run_as_task
from gradfilter_ray.storage import Location

CANONICAL_COLUMNS = ["id", "instruction", "input", "output"]


def check_tokens(data: Location, tokens: Location) -> dict:
    """`tokens/` has exactly the ids of `data/`, each once; its row and token counts."""
    import pyarrow.parquet as pq

    def read(where: Location, columns: list[str]):
        return pq.read_table(where.path, columns=columns, filesystem=where.filesystem)

    written = read(tokens, ["id", "n_tokens", "n_response_tokens"])
    if not np.array_equal(np.sort(written["id"].to_numpy()), np.sort(read(data, ["id"])["id"].to_numpy())):
        raise RuntimeError(f"tokens/ does not hold every id of data/ exactly once ({written.num_rows} rows)")
    return {
        "rows": written.num_rows,
        "rows_no_response_tokens": int(np.sum(written["n_response_tokens"].to_numpy() == 0)),
        "tokens": int(np.sum(written["n_tokens"].to_numpy())),
    }


def run(cfg: Config, run: RunDir, key: str) -> dict:
    import ray.data

    from gradfilter_ray.data.tokenized import tokenize_rows

    data, out = run.data, run.tokens
    ds = ray.data.read_parquet(data.path, filesystem=data.filesystem, **IO_REMOTE_ARGS)
    ds = ds.select_columns(CANONICAL_COLUMNS).map_batches(
        tokenize_rows, fn_kwargs={"proxy": cfg.proxy}, batch_size=1024, batch_format="pyarrow"
    )
    ds.write_parquet(out.path, filesystem=out.filesystem, ray_remote_args=IO_REMOTE_ARGS)
    return run_as_task(check_tokens, data, out)
