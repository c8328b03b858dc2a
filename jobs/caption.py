"""Regenerate the captions of existing pair shards with a new backend, model or prompt version.

    python -m jobs.caption --shards runs/data/shards --output runs/data/captions-qwen2b-v1 \
        --backend qwen2vl --model /models/Qwen2-VL-2B-Instruct --prompt-version v1 [--overwrite]

Images are not re-synthesised: the shards are read, captioned, and a caption table
(CAPTION_SCHEMA: `sample_id` + caption columns, incl. `caption_model` and
`caption_prompt_version`) is written as Parquet part files under `--output`, one part per pair
shard. Readers join on `sample_id` (`pipeline.caption_tables.join_captions`).

The output is written through `pipeline.output`: a lease (a second concurrent run refuses), a
run record (`_run.json`: backend, caption model, prompt version and the settings that change
captions; a rerun with others is refused — `--overwrite` or a new `--output`), and atomic parts
(dot-file, then rename). A rerun captions only the shards whose part is missing: resume state is
the list of committed parts, never a list of sample_ids.
"""
from __future__ import annotations

import argparse
import logging
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

from jobs.common import add_ray_args, job_main, using_ray
from pipeline.logs import Progress
from pipeline import output as out
from pipeline.fingerprint import checkpoint_digest
from pipeline.listing import task_count
from pipeline.caption import BACKENDS, DEFAULT_MODEL, CaptionConfig
from pipeline.caption_tables import caption_shards, plan_parts

# CaptionConfig fields that change the captions (with `caption_model`): the run record's params.
RESULT_FIELDS = ("backend", "prompt_version", "max_new_tokens", "min_new_tokens", "min_pixels",
                 "max_pixels", "max_words", "dtype")

MAX_BLOCKS = 4096  # shards are streamed as (at most) this many blocks: progress every few shards

logger = logging.getLogger("flowsr.caption")


@dataclass(frozen=True)
class RegenerateConfig:
    shards: str  # directory (or URI) of pair shards
    output: str  # caption table directory (or URI)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    part_rows: int = 1024  # row-group size hint; parts follow the pair shards
    overwrite: bool = False  # delete the output's earlier captions instead of resuming
    address: Optional[str] = None

    def __post_init__(self):
        if self.caption.backend == "off":
            raise ValueError("backend 'off' writes no captions; choose template or qwen2vl")
        if self.part_rows < 1:
            raise ValueError(f"part_rows must be >= 1, got {self.part_rows}")

    def record(self) -> Dict:
        params = {"caption_model": self.caption.caption_model,
                  **{name: getattr(self.caption, name) for name in RESULT_FIELDS}}
        if self.caption.backend == "template":  # the template reads only the degradation params
            params = {k: params[k] for k in ("caption_model", "backend", "prompt_version", "max_words")}
        model = self.caption.model
        checkpoint = (checkpoint_digest(model)
                      if self.caption.backend == "qwen2vl" and os.path.exists(model) else None)
        return out.run_record("caption", self.shards, params, checkpoint)


def regenerate(cfg: RegenerateConfig, on_part: Optional[Callable[[int, Dict], None]] = None) -> Dict:
    """Caption every shard whose part is not committed yet; returns a summary.

    `on_part(index, {"part", "rows"})` is called after each part is committed (progress, tests).
    Raises OutputBusy / RunMismatch (one-line `pipeline.output.OutputError`s).
    """
    start = time.time()
    with using_ray(cfg.address, only_a_cluster=True):  # a dead cluster: one line, the output untouched
        with out.open_output(cfg.output, cfg.record(), overwrite=cfg.overwrite) as output:
            plan = plan_parts(cfg.shards, output)
            shard_rows = dict(zip(plan["parts"], out.part_rows(plan["filesystem"], list(plan["parts"]))))
            todo = [{"shard": p, "part": name} for p, name in plan["parts"].items() if name not in plan["done"]]
            summary = {"shards": len(plan["parts"]), "rows": sum(shard_rows.values()),
                       "already_captioned": sum(n for p, n in shard_rows.items() if plan["parts"][p] in plan["done"]),
                       "captioned": 0, "parts": 0, "removed_unfinished_parts": output.cleared, "output": cfg.output,
                       "caption_model": cfg.caption.caption_model,
                       "caption_prompt_version": cfg.caption.prompt_version}
            if todo:
                summary.update(_caption_missing(cfg, todo, on_part))
    summary["seconds"] = round(time.time() - start, 2)
    return summary


def _caption_missing(cfg: RegenerateConfig, todo: List[Dict], on_part) -> Dict:
    import ray

    with using_ray(cfg.address):
        # template captions take ~0.1 s a shard, less than a task's start: a task works through a
        # run of shards (task_count); a VLM's actors take the shards one at a time
        blocks = (task_count(len(todo), ray.cluster_resources().get("CPU", 1), MAX_BLOCKS)
                  if cfg.caption.backend == "template" else min(len(todo), MAX_BLOCKS))
        items = ray.data.from_items(todo, override_num_blocks=blocks)
        ds = caption_shards(items, cfg.caption, cfg.output, cfg.shards)
        captioned = parts = 0
        progress = Progress("caption parts", len(todo), "part")  # beside Ray Data's own display
        for row in ds.iter_rows():
            if on_part is not None:
                on_part(parts, row)
            captioned, parts = captioned + int(row["rows"]), parts + 1
            progress.update(parts, f"{captioned} captions")
        return {"captioned": captioned, "parts": parts}


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="directory / URI of the pair shards")
    p.add_argument("--output", required=True, help="caption table directory / URI")
    p.add_argument("--backend", default="template", choices=[b for b in BACKENDS if b != "off"],
                   help="captioner: qwen2vl (a VLM) or template (from the degradation parameters, no model)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="Qwen2-VL hub id or local directory")
    p.add_argument("--prompt-version", default="v1", help="caption prompt version, recorded per row")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per captioner call")
    p.add_argument("--num-gpus", type=float, default=1.0, help="GPUs per captioner actor (qwen2vl)")
    p.add_argument("--pool-size", type=int, default=None,
                   help="captioner actors (qwen2vl; default: one per GPU of the cluster at the start, 1 without GPUs)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="longest generated caption (qwen2vl)")
    p.add_argument("--device", default="auto", help="torch device of the captioner (auto: cuda when present)")
    p.add_argument("--dtype", default="auto", help="captioner dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--attn-implementation", default=None, help="transformers attention (e.g. sdpa, flash_attention_2)")
    p.add_argument("--cache-implementation", default=None, choices=[None, "static", "dynamic"],
                   help="KV cache of generate()")
    p.add_argument("--part-rows", type=int, default=1024, help="row-group size hint")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the output's earlier captions instead of resuming them")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    add_ray_args(p)


def config_from_args(args: argparse.Namespace) -> RegenerateConfig:
    caption = CaptionConfig(backend=args.backend, model=args.model, prompt_version=args.prompt_version,
                            batch_size=args.batch_size, num_gpus=args.num_gpus,
                            pool_size=args.pool_size, max_new_tokens=args.max_new_tokens,
                            device=args.device, dtype=args.dtype,
                            attn_implementation=args.attn_implementation,
                            cache_implementation=args.cache_implementation)
    return RegenerateConfig(shards=args.shards, output=args.output, caption=caption,
                            part_rows=args.part_rows, overwrite=args.overwrite, address=args.address)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        print(json.dumps(asdict(cfg), indent=2))
        return 0
    print(json.dumps(regenerate(cfg), indent=2))
    return 0


def main(argv=None) -> int:
    return job_main("caption", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
