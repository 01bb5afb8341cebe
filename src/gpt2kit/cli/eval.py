"""`gpt2kit eval`: zero-shot evaluation on the paper's benchmarks, printed like Table 3."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TABLE3_TASKS = "lambada,cbt-cn,cbt-ne,wikitext2,ptb,enwik8,text8,wikitext103,1bw"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="zero-shot evaluation (LAMBADA, CBT, WikiText, PTB, 1BW, ..., CoQA, CNN/DM, WMT14, NQ, Winograd)",
        description="Evaluate a model zero-shot on benchmark files in DIR with the paper's protocols and "
                    "print a table laid out like the paper's Table 3 (with the paper's numbers when the "
                    "model has a released size). Runs on several processes under torchrun. "
                    "See docs/eval.md and docs/eval_transfer.md for where each dataset file is obtained.")
    p.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                   help="a checkpoint folder (ours, Hugging Face or OpenAI's release) or a released name")
    p.add_argument("--tasks", default=TABLE3_TASKS, metavar="T1,T2,...",
                   help=f"comma-separated task names, or 'list' to list them (default: {TABLE3_TASKS})")
    p.add_argument("--data-dir", required=True, metavar="DIR", help="folder holding the datasets' files")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per forward pass (default 8)")
    p.add_argument("--stride", type=int, default=None, metavar="S",
                   help="sliding-window stride for long texts (default: half the context)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (default float32; bfloat16 is faster on recent CPUs, slightly inexact)")
    p.add_argument("--device", default=None, help="torch device (default: cpu, or cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--no-detokenize", action="store_true", help="score the datasets' tokenized text as is")
    p.add_argument("--shots", type=int, default=None, metavar="K",
                   help="example pairs in the prompt of the few-shot tasks (wmt14-*, nq; default 5)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of sampled generations (cnndm; default 0)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the results as JSON; until then FILE.partial keeps the answers of finished "
                        "batches, so the same command run again after an interruption resumes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval import evaluate, format_table3, released_size, results_document, task_names
    from ..eval.registry import TaskError

    if args.tasks == "list":
        print("\n".join(task_names()))
        return 0
    if args.shots is not None and args.shots < 0:  # (checked here too: it may go to no task asked for)
        raise TaskError(f"--shots must be at least 0, got {args.shots}")
    # checked again where they are used; here before a model of gigabytes loads
    for option, value in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--stride", args.stride)):
        if value is not None and value < 1:
            raise TaskError(f"{option} must be at least 1, got {value}")
    if args.out:
        from ..io import check_output_path

        check_output_path(args.out, folder=False, what="--out")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise TaskError("--tasks: expected at least one task name")
    known = task_names()
    for t in tasks:
        if t not in known:
            raise TaskError(f"--tasks: unknown task {t!r}; known tasks: {', '.join(known)}")

    from ..eval.evaluator import check_data_dir, make_task

    check_data_dir(args.data_dir)
    for t in tasks:  # a missing file (or a bad option) fails before the model loads
        make_task(t, args.data_dir, shots=args.shots, seed=args.seed).path  # noqa: B018

    import time

    import torch

    from ..generate import optimize_for_cpu
    from ..model import GPT2
    from ..tokenizer import Tokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device
    if world > 1:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None and torch.cuda.is_available():
            device = f"cuda:{local}"
        if device and device.startswith("cuda"):
            torch.cuda.set_device(device)  # NCCL's collectives use the current device
        dist.init_process_group("nccl" if device and device.startswith("cuda") else "gloo")
    rank = int(os.environ.get("RANK", "0"))
    journal = None
    if args.out:  # one per process: each resumes its own share of the batches
        journal = f"{args.out}.partial" + (f".rank{rank}" if world > 1 else "")
    try:
        dtype = getattr(torch, args.dtype)
        # on CPU, the inference forms of the layers (packed output layer, decode kernel): same scores
        model = optimize_for_cpu(GPT2.from_pretrained(args.model, dtype=dtype, device=device).eval(), inplace=True)
        tokenizer = Tokenizer.from_pretrained(args.model)
        start = time.perf_counter()
        results = evaluate(model, tokenizer, tasks, args.data_dir, limit=args.limit, batch_size=args.batch_size,
                           stride=args.stride, detokenize=not args.no_detokenize, progress=_progress(),
                           task_options={"shots": args.shots, "seed": args.seed}, journal=journal,
                           keep_journal=True)
        seconds = time.perf_counter() - start
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    size = released_size(model.config)
    name = os.path.basename(os.path.normpath(args.model))
    print(format_table3(results, model_name=name, model_size=size))
    from ..eval.transfer_metrics import format_transfer

    transfer = format_transfer(results, model_name=name, paper_size=size)
    if transfer:
        print("\n" + transfer)
    if args.out:
        from ..io import write_json

        options = {"tasks": tasks, "data_dir": os.path.abspath(args.data_dir), "limit": args.limit,
                   "batch_size": args.batch_size, "stride": args.stride, "dtype": args.dtype,
                   "detokenize": not args.no_detokenize, "world_size": world, "shots": args.shots,
                   "seed": args.seed}
        write_json(args.out, results_document(results, model=args.model, model_size=size, options=options,
                                              seconds=seconds))
        # only now are the answers safe: every rank's journal goes (those on this machine's disks)
        for r in range(world):
            Path(f"{args.out}.partial" + (f".rank{r}" if world > 1 else "")).unlink(missing_ok=True)
    n_docs = sum(r["counts"]["documents"] for r in results.values())
    print(f"evaluated {len(tasks)} task{'' if len(tasks) == 1 else 's'}, {n_docs:,} document{'' if n_docs == 1 else 's'} "
          f"in {seconds:.1f}s"
          + (f"; results in {args.out}" if args.out else ""))
    return 0


def _progress() -> bool | float:
    """A live bar on a terminal; in a log (nohup, a scheduler) a bar redrawn every 30 s, so that
    hours of evaluation show how far they are without filling the log."""
    return True if sys.stderr.isatty() else 30.0
