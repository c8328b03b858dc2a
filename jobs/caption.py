"""Regenerate the captions of existing pair shards with a new backend, model or prompt version.

    python -m jobs.caption --shards runs/data/shards --output runs/data/captions-qwen2b-v1 \
        --backend qwen2vl --model /models/Qwen2-VL-2B-Instruct --prompt-version v1

Images are not re-synthesised: the shards are read, captioned, and a caption table
(CAPTION_SCHEMA: `sample_id` + caption columns, incl. `caption_model` and
`caption_prompt_version`) is written as Parquet part files under `--output`. Readers join on
`sample_id` (`pipeline.caption.join_captions`). Each part is written to a dot-file and renamed,
so a killed run leaves only whole parts; a rerun captions only the sample_ids still missing.
One writer per output directory.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

from jobs.common import add_ray_args, init_ray, resolve_fs
from pipeline.caption import (BACKENDS, DEFAULT_MODEL, TMP_PREFIX, CaptionConfig, add_caption_stage,
                              read_caption_table, required_columns, write_caption_part)
from pipeline.schema import CAPTION_SCHEMA


@dataclass(frozen=True)
class RegenerateConfig:
    shards: str  # directory (or URI) of pair shards
    output: str  # caption table directory (or URI)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    part_rows: int = 1024  # caption rows per part file (the resume granularity)
    address: Optional[str] = None

    def __post_init__(self):
        if self.caption.backend == "off":
            raise ValueError("backend 'off' writes no captions; choose template or qwen2vl")
        if self.part_rows < 1:
            raise ValueError(f"part_rows must be >= 1, got {self.part_rows}")


def pair_shard_paths(uri: str) -> List[str]:
    """Parquet files under `uri` holding pair rows (sample_id + hr), sorted; dot/underscore files skipped."""
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    filesystem, root = resolve_fs(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    paths = sorted(i.path for i in infos if i.is_file and i.base_name.endswith(".parquet")
                   and not i.base_name.startswith((".", "_")))
    return [p for p in paths
            if {"sample_id", "hr"} <= set(pq.read_schema(p, filesystem=filesystem).names)]


def check_same_captioner(existing, cfg: CaptionConfig, output: str) -> None:
    """Refuse to mix captions of another model or prompt version into one table."""
    found = {(m, v) for m, v in zip(existing["caption_model"].to_pylist(),
                                    existing["caption_prompt_version"].to_pylist())}
    if found - {(cfg.caption_model, cfg.prompt_version)}:
        raise ValueError(f"{output} already holds captions by {sorted(found)}, not "
                         f"{(cfg.caption_model, cfg.prompt_version)}; write to a new --output")


def remove_unfinished_parts(uri: str) -> int:
    """Delete temp files a killed run left behind; returns how many."""
    from pyarrow import fs as pafs

    filesystem, root = resolve_fs(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    stale = [i.path for i in infos if i.is_file and i.base_name.startswith(TMP_PREFIX)]
    for path in stale:
        filesystem.delete_file(path)
    return len(stale)


def regenerate(cfg: RegenerateConfig, on_part: Optional[Callable[[int, object], None]] = None) -> Dict:
    """Caption every shard row whose sample_id is not yet in the table; returns a summary.

    `on_part(index, table)` is called after each part is written (progress hooks, tests).
    """
    import pyarrow.parquet as pq

    start = time.time()
    shard_fs, _ = resolve_fs(cfg.shards)
    paths = pair_shard_paths(cfg.shards)
    if not paths:
        raise FileNotFoundError(f"no pair shards (Parquet with sample_id and hr) under {cfg.shards}")
    all_ids = [i for p in paths for i in
               pq.read_table(p, columns=["sample_id"], filesystem=shard_fs)["sample_id"].to_pylist()]
    stale = remove_unfinished_parts(cfg.output)
    existing = read_caption_table(cfg.output, columns=["sample_id", "caption_model",
                                                       "caption_prompt_version"])
    check_same_captioner(existing, cfg.caption, cfg.output)
    done = set(existing["sample_id"].to_pylist())
    todo = [i for i in all_ids if i not in done]
    summary = {"shards": len(paths), "rows": len(all_ids), "already_captioned": len(all_ids) - len(todo),
               "captioned": 0, "parts": 0, "removed_unfinished_parts": stale, "output": cfg.output,
               "caption_model": cfg.caption.caption_model,
               "caption_prompt_version": cfg.caption.prompt_version}
    if todo:
        summary.update(_caption_missing(cfg, paths, todo, done, on_part))
    summary["seconds"] = round(time.time() - start, 2)
    return summary


def _caption_missing(cfg: RegenerateConfig, paths, todo, done, on_part) -> Dict:
    import ray
    from ray.data.expressions import col
    from tqdm import tqdm

    started = init_ray(cfg.address)
    try:
        _write_config(cfg)
        filesystem, _ = resolve_fs(cfg.shards)
        ds = ray.data.read_parquet(paths, filesystem=filesystem, columns=list(required_columns(cfg.caption)))
        if done:
            ds = ds.filter(expr=col("sample_id").is_in(todo))
        ds = add_caption_stage(ds, cfg.caption).select_columns(CAPTION_SCHEMA.names)
        run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        captioned = parts = 0
        with tqdm(total=len(todo), desc="captions", unit="row", file=sys.stderr) as progress:
            for batch in ds.iter_batches(batch_size=cfg.part_rows, batch_format="pyarrow"):
                write_caption_part(batch, cfg.output, f"{run}-{parts:05d}")
                if on_part is not None:
                    on_part(parts, batch)
                captioned, parts = captioned + batch.num_rows, parts + 1
                progress.update(batch.num_rows)
        return {"captioned": captioned, "parts": parts}
    finally:
        if started:
            ray.shutdown()


def _write_config(cfg: RegenerateConfig) -> None:
    """The resolved config, next to the parts (underscore: readers skip it)."""
    filesystem, root = resolve_fs(cfg.output)
    filesystem.create_dir(root, recursive=True)
    with filesystem.open_output_stream(f"{root}/_caption_config.json") as f:
        f.write(json.dumps(asdict(cfg), indent=2).encode())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.caption", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shards", required=True, help="directory / URI of the pair shards")
    p.add_argument("--output", required=True, help="caption table directory / URI")
    p.add_argument("--backend", default="template", choices=[b for b in BACKENDS if b != "off"])
    p.add_argument("--model", default=DEFAULT_MODEL, help="Qwen2-VL hub id or local directory")
    p.add_argument("--prompt-version", default="v1")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per captioner call")
    p.add_argument("--num-gpus", type=float, default=1.0, help="GPUs per captioner actor (qwen2vl)")
    p.add_argument("--pool-size", type=int, default=1, help="captioner actors (qwen2vl)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attn-implementation", default=None)
    p.add_argument("--cache-implementation", default=None, choices=[None, "static", "dynamic"])
    p.add_argument("--part-rows", type=int, default=1024, help="rows per part file")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    add_ray_args(p)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RegenerateConfig:
    caption = CaptionConfig(backend=args.backend, model=args.model, prompt_version=args.prompt_version,
                            batch_size=args.batch_size, num_gpus=args.num_gpus,
                            pool_size=args.pool_size, max_new_tokens=args.max_new_tokens,
                            device=args.device, dtype=args.dtype,
                            attn_implementation=args.attn_implementation,
                            cache_implementation=args.cache_implementation)
    return RegenerateConfig(shards=args.shards, output=args.output, caption=caption,
                            part_rows=args.part_rows, address=args.address)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if args.dry_run:
        print(json.dumps(asdict(cfg), indent=2))
        return {}
    summary = regenerate(cfg)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
