"""Input pipeline throughput: examples/s of the full preprocessing pipeline, 0 vs N workers.

Two data sets: emo_synth (56x56 images, demo pixel bounds) and a folder of real-size photos
(640x480 JPEGs of scikit-image photos, resized within the recipe's min/max pixels). Each row
times a training pipeline (shuffle, repeat) from the first batch on, so worker start-up is
reported separately. Usage:

    python bench/data.py [--examples 256] [--batch_size 16] [--workers 0,2] [--seconds 20]
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

from absl import flags


def _tokenizer(real: bool):
    from emor3_jax.processing import tokenizer as tok
    qwen = tok.qwen_tokenizer_dir()
    if real and qwen is not None:
        return tok.load_tokenizer(qwen), "qwen2"
    return tok.build_demo_tokenizer(), "demo"


def _time_pipeline(pipe, batches: int, seconds: float) -> tuple[float, float, int]:
    """(start-up seconds to the first batch, steady examples/s, batches timed)."""
    start = time.perf_counter()
    it = iter(pipe)
    next(it)
    first = time.perf_counter()
    done, examples = 0, 0
    while done < batches and time.perf_counter() - first < seconds:
        batch = next(it)
        examples += int(batch.row_valid.sum()) + int(batch.num_skipped)
        done += 1
    elapsed = time.perf_counter() - first
    it.close()
    return first - start, examples / elapsed, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256, help="photos in the folder set")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument("--batches", type=int, default=40, help="batches timed per row (max)")
    parser.add_argument("--seconds", type=float, default=20.0, help="time limit per row")
    parser.add_argument("--read_threads", type=int, default=2)
    parser.add_argument("--workdir", default="", help="where to write data (default: a tmp dir)")
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()
    logging.getLogger("emor3_jax").setLevel(logging.ERROR)

    import emor3_jax.data as data
    from emor3_jax.configs import base
    from emor3_jax.data import pipeline
    from emor3_jax.data.sample_files import write_image_folder

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
    data_dir = os.path.join(workdir, "tfds")
    synth_config = data.synth_config(num_train=2000, num_validation=0, num_test=0)
    t0 = time.perf_counter()
    data.EmoSynth(config=synth_config, data_dir=data_dir).download_and_prepare()
    synth_prepare = time.perf_counter() - t0
    manual = os.path.join(workdir, "photos")
    if not os.path.isdir(manual):
        labels = [base.MIKELS_LABELS[i % 8] for i in range(args.examples)]
        write_image_folder(manual, {"train": labels}, height=480, width=640)
    t0 = time.perf_counter()
    builder, _ = pipeline.open_source("emoset2k", "train", data_dir=data_dir, manual_dir=manual)
    photo_prepare = time.perf_counter() - t0

    cases = [
        ("emo_synth 56x56", "emo_synth", synth_config, False,
         dict(min_pixels=56 * 56, max_pixels=56 * 56, max_prompt_len=512,
              prompt_buckets=(256, 512))),
        ("photos 640x480", "emoset2k", None, True,
         dict(min_pixels=base.MIN_PIXELS, max_pixels=base.MAX_PIXELS, max_prompt_len=2048,
              prompt_buckets=(256, 512, 1024, 2048))),
    ]
    print(f"prepare: emo_synth 2000 examples {synth_prepare:.1f} s, "
          f"{args.examples} photos {photo_prepare:.1f} s; cpus: {os.cpu_count()}")
    print(f"| data set | tokenizer | workers | batch | start-up s | examples/s |")
    print(f"|---|---|---|---|---|---|")
    for title, name, config, real, pixels in cases:
        tokenizer, tok_name = _tokenizer(real)
        for workers in (int(w) for w in args.workers.split(",")):
            cfg = pipeline.PipelineConfig(batch_size=args.batch_size, num_epochs=None,
                                          num_workers=workers, read_threads=args.read_threads,
                                          process_index=0, process_count=1, **pixels)
            pipe = pipeline.make_pipeline(name, "train", tokenizer, cfg, data_dir=data_dir,
                                          config=config)
            startup, rate, done = _time_pipeline(pipe, args.batches, args.seconds)
            print(f"| {title} | {tok_name} | {workers} | {args.batch_size} | {startup:.1f} | "
                  f"{rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
