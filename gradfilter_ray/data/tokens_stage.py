"""Tokens stage (Ray shell): `data/` -> `tokens/`, the corpus tokenised once with the proxy tokenizer.

Ray Data streams `data/` through `tokenized.tokenize_rows` (plain tasks, one tokenizer per worker process) and the
workers write `tokens/` Parquet straight to the run directory. One Ray task then checks that `tokens/` holds every
`data/` id exactly once and counts rows and tokens. The ensemble and the extraction read `tokens/`; neither
tokenises again.
"""

from __future__ import annotations

from gradfilter_ray.config import Config, ProxyConfig
from gradfilter_ray.row_accounting import account_token_rows
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import IO_REMOTE_ARGS, run_as_task

# Extraction reads `tokens/` one shard (a row range of one file) at a time: small row groups let it read only the rows
# it needs, and files of many rows keep shards (which never span files) at their configured size.
ROW_GROUP_ROWS = 1024
MIN_ROWS_PER_FILE = 65_536


def run(cfg: Config, run: RunDir, key: str) -> dict:
    import ray.data

    from gradfilter_ray.data.tokenized import TEXT_COLUMNS, tokenize_rows

    data, out = run.data, run.tokens
    ds = ray.data.read_parquet(data.path, filesystem=data.filesystem, **IO_REMOTE_ARGS)
    ds = ds.select_columns(TEXT_COLUMNS).map_batches(
        tokenize_rows, fn_kwargs={"proxy": cfg.proxy}, batch_size=1024, batch_format="pyarrow"
    )
    ds.write_parquet(
        out.path,
        filesystem=out.filesystem,
        ray_remote_args=IO_REMOTE_ARGS,
        row_group_size=ROW_GROUP_ROWS,
        min_rows_per_file=MIN_ROWS_PER_FILE,
    )
    return run_as_task(account_tokens, data, out, cfg.proxy)


def account_tokens(data, out, proxy: ProxyConfig) -> dict:
    """Every data/ id once in tokens/, with row and token counts, the rows left untrained for a reason other than
    truncation (a multi-turn conversation under the Alpaca prompt, a chat template that cannot be cut), and the
    rows that list tools with whether the template writes them (one that does not trains those rows without)."""
    from gradfilter_ray.parquet_stream import non_null_count, parquet_files, read_columns

    skipped = [r for r in read_columns(out, ["skip_reason"])["skip_reason"].to_pylist() if r is not None]
    with_tools = non_null_count(parquet_files(data), "tools")
    return {
        **account_token_rows(data, out),
        "skipped_by_reason": {r: skipped.count(r) for r in sorted(set(skipped))},
        "rows_with_tools": with_tools,
        "template_renders_tools": template_renders_tools(proxy) if with_tools else None,
    }


def template_renders_tools(proxy: ProxyConfig) -> bool | None:
    """False under the Alpaca prompt (it has no place for tools); None when the template refuses the probe."""
    from gradfilter_ray.data.chat_tokens import renders_tools, template_errors
    from gradfilter_ray.models import load_tokenizer

    if proxy.template != "chat":
        return False
    try:
        return renders_tools(load_tokenizer(proxy.model), proxy.chat_template)
    except template_errors():
        return None
