#!/usr/bin/env python
"""One command that checks svftune's CUDA paths on a lent GPU within a time budget (and runs on a CPU too).

    PYTHONPATH=src:examples/fss/src python benchmarks/gpu_check.py --out DIR [--mini-root MINI]
    PYTHONPATH=src:examples/fss/src python benchmarks/gpu_check.py --device cpu --quick --out DIR

Writes ``DIR/gpu_check.json``, ``DIR/gpu_check.md`` and ``DIR/gpu_check.log`` (each section's output tail).
Sections (``--sections`` picks some, in this order; see each ``benchmarks/_gpu/<section>.py``):

- ``exactness``      apply / merge / unapply and the three_op / rebuilt / lean forms against float64, per
                     precision (fp32 TF32 off, fp32 TF32 on, bf16 and fp16 autocast), ResNet-50 and a ViT block;
- ``checkpoints``    checkpoints trained and saved on one device, loaded onto a base decomposed on the other
                     (tied singular values), and the decomposition cache across devices;
- ``decomposition``  apply_svf vs bare SVDs (float64, float32): ResNet-50 layers 2-4, whole VGG16;
- ``training``       ResNet-50 layers 2-4 training step at 473 px, OS8, batch 8 (fp32 / bf16): SVF forms vs
                     direct fine-tuning vs the frozen floor; whether "auto" picks the fastest form per layer;
- ``fss``            ``svf_fss`` training (baseline, PFENet, BAM with SVF) on the mini data under torchrun with
                     one process (NCCL on CUDA, gloo on CPU), DDP and SyncBatchNorm; peak memory 1- and 5-shot;
- ``lora``           SVF against PEFT LoRA on the same layers (skipped when peft is missing);
- ``cuda_tests``     ``pytest -m cuda`` (the CUDA-only tests) in a subprocess.

Every section runs in its own subprocess with a share of the budget (``--budget-s``; default 480 s on CUDA)
that it sizes its loops to, and a hard time limit; a section that fails or runs out of time is reported with
its traceback's last lines and what it had measured, and the others still run. Sections that no longer fit are
reported as "skipped: budget". The exit status is 1 when a section failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: section -> its share of the budget (relative weights): (full run, --quick), from measured run times
SECTIONS = {
    "exactness": (45, 22),
    "checkpoints": (25, 8),
    "decomposition": (55, 18),
    "training": (90, 20),
    "fss": (190, 60),
    "lora": (35, 16),
    "cuda_tests": (35, 8),
}
STARTUP_S = 20.0  # a section's process start (imports, CUDA context) on top of its share, for the hard limit
MIN_START_S = {True: 4.0, False: 12.0}  # quick / full: below this much budget a section is not started
PACKAGES = ("torchvision", "numpy", "safetensors", "peft", "timm", "transformers", "huggingface_hub", "tqdm")


# ------------------------------------------------------------------------------------------- worker side
def worker(args: argparse.Namespace) -> int:
    """Run one section in this process (``--worker NAME``); its report is saved as it goes."""
    import torch

    sys.path.insert(0, str(HERE))
    from _gpu.common import Context, Report

    report = Report(Path(args.report))
    report.save()
    torch.manual_seed(0)
    ctx = Context(
        device=torch.device(args.device),
        quick=args.quick,
        deadline=args.deadline,
        scratch=Path(args.scratch),
        report=report,
        mini_root=args.mini_root,
        options={"out": args.out},
    )
    try:
        importlib.import_module(f"_gpu.{args.worker}").run(ctx)
    except BaseException as err:  # reported, then the parent goes on with the next section
        report.data["error"] = "".join(traceback.format_exception(err)).strip().splitlines()[-12:]
        report.save()
        traceback.print_exc()
        return 1
    return 0


# ------------------------------------------------------------------------------------------- parent side
def environment(device: str) -> dict:
    """Versions, device and TF32 flags, for the report's header."""
    import importlib.metadata

    import torch

    sys.path.insert(0, str(HERE))
    from _gpu.common import tf32_flags

    import svftune

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_start": "/".join(f"{x:.2f}" for x in os.getloadavg()),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "svftune": svftune.__version__,
        "device": device,
        **tf32_flags(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(
            gpu=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
        )
        try:
            version = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
            info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception as err:  # the header must never stop the run
            info["nccl"] = f"unknown ({type(err).__name__})"
    for name in PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info


def section_env() -> dict:
    paths = [str(REPO / "src"), str(REPO / "examples" / "fss" / "src"), str(HERE)]
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([old] if old else [])), "PYTHONUNBUFFERED": "1"}


def run_section(name: str, args: argparse.Namespace, soft: float, hard: float, scratch: Path) -> dict:
    """Start one section's process, wait at most ``hard`` seconds, and read its report."""
    report = scratch / f"{name}.json"
    log = scratch / f"{name}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--report", str(report)]
    command += ["--device", args.device, "--deadline", repr(time.time() + 0.9 * soft), "--scratch", str(scratch / name)]
    command += ["--out", str(args.out)] + (["--quick"] if args.quick else [])
    command += ["--mini-root", args.mini_root] if args.mini_root else []
    shutil.rmtree(scratch / name, ignore_errors=True)  # a reused --scratch must not leave stale files
    (scratch / name).mkdir(parents=True)
    tic = time.time()
    timed_out = False
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=section_env(), start_new_session=True
        )
        try:
            rc = process.wait(timeout=hard)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)  # the section's own process group (its torchrun children too)
            rc = process.wait()
    seconds = time.time() - tic
    try:
        result = json.loads(report.read_text())
    except (OSError, ValueError):
        result = {"checks": [], "metrics": {}, "tables": [], "notes": [], "skip": None}
    result["seconds"] = round(seconds, 1)
    result["returncode"] = rc
    result["log_tail"] = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    result["status"] = status_of(result, timed_out, hard)
    return result


def nonfinite(value, key: str = "") -> list[str]:
    """Keys of metrics that are not finite numbers (NaN/Inf are stored as strings)."""
    if isinstance(value, dict):
        return [k for sub, v in value.items() for k in nonfinite(v, f"{key}.{sub}" if key else str(sub))]
    if isinstance(value, list):
        return [k for i, v in enumerate(value) for k in nonfinite(v, f"{key}[{i}]")]
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return [key]
    if isinstance(value, float) and not math.isfinite(value):
        return [key]
    return []


def status_of(result: dict, timed_out: bool, hard: float) -> str:
    bad = nonfinite(result.get("metrics", {}))
    result["nonfinite_metrics"] = bad
    if timed_out:
        return f"failed: stopped at its time limit ({hard:.0f} s); what it measured is kept"
    if result.get("error"):
        return "failed: " + result["error"][-1][:200]
    if result["returncode"] != 0:
        return f"failed: exit status {result['returncode']} (see the log tail)"
    failed = [c["name"] for c in result["checks"] if not c["ok"]]
    if failed:
        return (
            f"failed: {len(failed)} of {len(result['checks'])} checks ({failed[0]}{', ...' if len(failed) > 1 else ''})"
        )
    if bad:
        return f"failed: non-finite metrics ({', '.join(bad[:3])})"
    if result.get("skip"):
        return f"skipped: {result['skip']}"
    if result.get("partial"):
        return f"passed, partial: {len(result['partial'])} part(s) left out for time ({result['partial'][0]}, ...)"
    return "passed"


def markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = ["# gpu_check report", "", f"Command: `{summary['command']}`", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", f"Budget {summary['budget_s']:.0f} s, used {summary['total_seconds']:.0f} s.", ""]
    lines += ["| section | status | seconds | checks passed |", "|---|---|---|---|"]
    for name, r in summary["sections"].items():
        checks = r.get("checks", [])
        passed = sum(c["ok"] for c in checks)
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.0f} | {passed}/{len(checks)} |")
    for name, r in summary["sections"].items():
        lines += ["", f"## {name}: {r['status']}", ""]
        for check in r.get("checks", []):
            if not check["ok"]:
                lines.append(f"- FAILED {check['name']}: {check['value']} (limit {check['limit']}) {check['detail']}")
        for note in r.get("notes", []):
            lines.append(f"- note: {note}")
        if r.get("error"):
            lines += ["", "```", *r["error"], "```"]
        for table in r.get("tables", []):
            lines += ["", f"**{table['title']}**", ""]
            lines += ["| " + " | ".join(table["header"]) + " |", "|" + "---|" * len(table["header"])]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table["rows"]]
        if r.get("metrics"):
            lines += ["", "<details><summary>metrics</summary>", "", "```json", json.dumps(r["metrics"], indent=1)]
            lines += ["```", "", "</details>"]
    return "\n".join(lines) + "\n"


def write_reports(out: Path, summary: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(summary))
    with open(out / "gpu_check.log", "w") as log:
        for name, r in summary["sections"].items():
            log.write(f"===== {name}: {r['status']}\n{r.get('log_tail', '')}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json / .md / .log")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere (a CPU smoke run)")
    parser.add_argument(
        "--budget-s", type=float, help="total seconds (default: 480 on CUDA, 240 with --quick, 900 else)"
    )
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), help="run only these (in the usual order)")
    parser.add_argument("--mini-root", help="the svf_fss mini dataset (default: DIR/mini-data, generated if missing)")
    parser.add_argument("--scratch", help="working folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: PyTorch sees no CUDA device here; use --device cpu")
    cuda = args.device.startswith("cuda")
    budget = args.budget_s or (480.0 if cuda else 240.0 if args.quick else 900.0)
    if budget <= 0:
        parser.error("--budget-s must be positive")
    start = time.time()
    end = start + budget
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    args.mini_root = str(Path(args.mini_root).resolve()) if args.mini_root else str(out / "mini-data")
    scratch = Path(args.scratch).resolve() if args.scratch else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    scratch.mkdir(parents=True, exist_ok=True)
    summary = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": environment(args.device),
        "quick": args.quick,
        "budget_s": budget,
        "sections": {},
    }
    names = [n for n in SECTIONS if not args.sections or n in args.sections]
    print(f"gpu_check on {args.device} ({summary['environment'].get('gpu', 'cpu')}), budget {budget:.0f} s", flush=True)
    for index, name in enumerate(names):
        remaining = end - time.time()
        if remaining < MIN_START_S[args.quick]:
            summary["sections"][name] = {"status": "skipped: budget", "seconds": 0.0}
        else:
            weight = {n: SECTIONS[n][1 if args.quick else 0] for n in names}
            soft = remaining * weight[name] / sum(weight[n] for n in names[index:])
            hard = min(remaining, soft * 1.5 + STARTUP_S)
            summary["sections"][name] = run_section(name, args, soft, hard, scratch)
        summary["total_seconds"] = round(time.time() - start, 1)
        write_reports(out, summary)
        print(f"  {name}: {summary['sections'][name]['status']} ({summary['sections'][name]['seconds']:.0f} s)")
    summary["total_seconds"] = round(time.time() - start, 1)
    summary["load_end"] = "/".join(f"{x:.2f}" for x in os.getloadavg())
    write_reports(out, summary)
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    failed = [n for n, r in summary["sections"].items() if r["status"].startswith("failed")]
    print(f"done in {summary['total_seconds']:.0f} s; failed: {', '.join(failed) or 'none'}; report: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
