"""One unattended check of the product on one GPU (``bench/gpu_check.sh OUTDIR`` runs it).

1. Exactness on the device, fp32 (no TF32): dense mode == timm; the visible-only encoder ==
   the independent masked reference (``tests/core/swin_reference.py``) with both attention
   cores, plans made ahead and pinned; on CUDA also flex gradients == SDPA gradients.
2. Training steps (forward + backward + fused AdamW), bf16 autocast, mask ratio 0.75:
   Swin-B/224 w7 at batch 128 and Swin-L/224 w14 at batch 64, GreenMIM vs the SimMIM-style
   dense baseline of ``bench_pretrain_step`` in the same process (``bench_scaling.measure_step``):
   median step time of >= 20 steps after warm-up, images/s, step and peak-memory ratios,
   planner time on the training thread as a share of the step, executed/visible tokens.
3. A Ray Train job (one GPU worker, the built-in digits through the real data loader, about two
   minutes of training): its images/s against the step-only rate of the same configuration.

Writes ``results.json`` and ``results.md`` under ``--out``. ``--device cpu`` runs the same
sections with micro models, small batches and a short job (for machines without a GPU).

    python bench/gpu_check.py --out OUTDIR [--device cpu] [--job-seconds 120]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

import timm  # noqa: E402
from bench_scaling import measure_step  # noqa: E402

import greenmim_core as gc  # noqa: E402
from greenmim_core.masking import random_mask  # noqa: E402
from tests.core.swin_reference import at_visible, reference_stages  # noqa: E402

GPU_CONFIGS = [("swin_base_patch4_window7_224", 128), ("swin_large_patch4_window14_224", 64)]
CPU_CONFIGS = [("swin_micro_patch2_window4_64", 8), ("swin_micro_patch2_window8_64", 8)]


def _randomised(name: str, seed: int):
    torch.manual_seed(seed)
    enc = gc.create_model(name).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return enc


def exactness(device: torch.device) -> list[dict]:
    cuda = device.type == "cuda"
    tol = 1e-4 if cuda else 1e-5
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    names = ["swin_micro_patch2_window4_64", "swin_micro_patch2_window8_64"]
    for name in [*names, "swin_tiny_patch4_window7_224"]:
        enc = _randomised(name, 0).to(device)
        ref = timm.create_model(enc.cfg.timm_arch, num_classes=0, **enc.cfg.model_args())
        ref.load_state_dict(enc.state_dict(), strict=True)
        ref = ref.eval().to(device)
        images = torch.randn(2, 3, enc.img_size, enc.img_size, device=device)
        with torch.no_grad():
            err = (enc(images) - ref.forward_features(images).flatten(1, 2)).abs().max().item()
        rows.append({"check": "dense == timm", "model": name, "max_abs_err": err, "tol": tol})
    for name in names:
        for ratio in (0.5, 0.75):
            enc = _randomised(name, 1).to(device)
            g = torch.Generator().manual_seed(int(ratio * 100))
            images = torch.randn(3, 3, enc.img_size, enc.img_size, generator=g).to(device)
            mask = random_mask(3, enc.mask_grid(enc.final_stride), ratio, generator=g)
            plan = enc.plan(mask)
            if cuda:
                plan = plan.pin_memory()
            with torch.no_grad():
                expected = reference_stages(enc, images, mask.to(device))
            for backend in ("sdpa", "flex"):
                enc.attention_backend = backend
                with torch.no_grad():
                    _, stages = enc.forward_visible(images, mask, plan, return_stages=True)
                err = max(
                    (o - at_visible(d, mask.to(device))).abs().max().item()
                    for o, d in zip(stages, expected, strict=True)
                )
                rows.append({"check": f"masked == reference ({backend}, ratio {ratio})",
                             "model": name, "max_abs_err": err, "tol": tol})  # fmt: skip
        if not cuda:
            rows.append({"check": "flex grads == sdpa grads", "model": name, "max_abs_err": None,
                         "tol": None, "skipped": "FlexAttention has no backward on CPU"})  # fmt: skip
            continue
        enc = _randomised(name, 2).to(device).train()
        images = torch.randn(2, 3, enc.img_size, enc.img_size, device=device)
        mask = random_mask(2, enc.mask_grid(enc.final_stride), 0.75)
        grads = {}
        for backend in ("sdpa", "flex"):
            enc.zero_grad()
            enc.attention_backend = backend
            enc.forward_visible(images, mask).square().sum().backward()
            grads[backend] = {n: p.grad.clone() for n, p in enc.named_parameters()}
        err = max(
            ((grads["flex"][n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
            for n, g in grads["sdpa"].items()
        )
        rows.append({"check": "flex grads == sdpa grads (relative)", "model": name,
                     "max_abs_err": err, "tol": 1e-3})  # fmt: skip
    for r in rows:
        r.setdefault("ok", r.get("skipped") is not None or r["max_abs_err"] <= r["tol"])
    torch.backends.cuda.matmul.allow_tf32 = True
    return rows


def steps(device: torch.device, configs, runs: int, warmup: int, extra_until: float) -> list[dict]:
    """The step table; the first model also with the SDPA core and with compiled blocks, as
    long as ``time.monotonic() < extra_until`` (the check must end within its budget)."""
    rows = []
    for name, batch in configs:
        base = measure_step(name, batch, 0.75, device, "simmim", runs, warmup)
        variants = [("auto", False)]
        if name == configs[0][0]:
            variants += [("sdpa", False), ("auto", True)]
        for backend, compiled in variants:
            if (backend, compiled) != ("auto", False) and time.monotonic() > extra_until:
                rows.append({"name": name, "batch": batch, "backend": backend,
                             "compile": compiled, "error": "skipped: time budget"})  # fmt: skip
                continue
            try:
                ours = measure_step(name, batch, 0.75, device, "greenmim", runs, warmup,
                                    backend=backend, compile_blocks=compiled)  # fmt: skip
            except Exception as e:  # a variant that fails is reported, not fatal
                rows.append({"name": name, "batch": batch, "backend": backend,
                             "compile": compiled, "error": repr(e)[:500]})  # fmt: skip
                continue
            rows.append({
                "name": name, "batch": batch, "backend": backend, "compile": compiled,
                "step_s": ours["step_s"], "step_range": [ours["step_s_min"], ours["step_s_max"]],
                "images_per_s": ours["images_per_s"],
                "baseline_step_s": base["step_s"],
                "baseline_range": [base["step_s_min"], base["step_s_max"]],
                "baseline_images_per_s": base["images_per_s"],
                "step_ratio": ours["step_s"] / base["step_s"],
                "peak_bytes": ours["peak_bytes"], "baseline_peak_bytes": base["peak_bytes"],
                "memory_ratio": ours["peak_bytes"] / base["peak_bytes"],
                "memory_kind": ours["memory_kind"],
                "planner_on_thread_share": ours["plan_on_thread_s"] / ours["step_s"],
                "planner_inline_s": ours["plan_inline_s"],
                "planner_inline_share": ours["plan_inline_s"] / (ours["step_s"] + ours["plan_inline_s"]),
                "executed_tokens": ours["executed_tokens"], "visible_tokens": ours["visible_tokens"],
                "dense_tokens": ours["dense_tokens"],
                "exec_per_visible": ours["executed_tokens"] / ours["visible_tokens"],
                "host_syncs_per_step": ours.get("host_syncs"), "sync_sites": ours.get("sync_sites"),
            })  # fmt: skip
    return rows


def ray_job(device: torch.device, name: str, batch: int, step_rate: float, seconds: float,
            workdir: Path) -> dict:  # fmt: skip
    """A pretraining job of about ``seconds`` of training through ``python -m workers.run``."""
    import os
    import subprocess

    from workers.local import LocalRayHead

    from workers.artifacts import read_metrics
    from workers.data import builtin_train_size
    from workers.spec import JobSpec
    from workers.storage import open_root

    cuda = device.type == "cuda"
    cpus = os.cpu_count() or 2
    loader_workers = max(1, min(10, cpus - 4)) if cuda else 1
    spec = {
        "kind": "pretrain", "model": name,
        "data": {"uri": "builtin:digits", "loader_workers": loader_workers},
        "train": {"epochs": 2, "global_batch_size": batch, "max_micro_batch": batch,
                  "base_lr": 1.5e-4, "seed": 0},
        "resources": {"num_workers": 1, "gpus_per_worker": 1 if cuda else 0,
                      "cpus_per_worker": float(loader_workers + 1 if cuda else 1),
                      "max_failures": 0},
        "checkpoint": {"every_epochs": 1000, "keep_last": 1},
    }  # fmt: skip
    cache = workdir / "cache"
    os.environ["GREENMIM_CACHE_DIR"] = str(cache)
    parsed = JobSpec.model_validate(spec)
    steps_per_epoch = parsed.steps_per_epoch(builtin_train_size(parsed.data))
    total_steps = max(4, math.ceil(seconds * step_rate / batch))
    if total_steps < 2 * steps_per_epoch:  # a short job: two epochs of a subset
        steps_per_epoch = math.ceil(total_steps / 2)
        spec["data"]["max_samples"] = steps_per_epoch * batch
    epochs = max(2, math.ceil(total_steps / steps_per_epoch))
    spec["train"]["epochs"] = epochs
    spec["checkpoint"]["every_epochs"] = epochs
    storage = workdir / "storage"
    spec_file = workdir / "job.json"
    spec_file.write_text(json.dumps(spec))
    head = LocalRayHead.start(
        num_cpus=cpus if cuda else 2, num_gpus=1 if cuda else 0,
        env={"PYTHONPATH": str(REPO), "GREENMIM_CACHE_DIR": str(cache)},
    )  # fmt: skip
    try:
        t0 = time.monotonic()
        with open(workdir / "job.log", "wb") as log:
            rc = subprocess.run(
                [sys.executable, "-m", "workers.run", "--spec", str(spec_file), "--job-id",
                 "gpucheck", "--tenant", "bench", "--storage-root", str(storage)],
                env=head.client_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            ).returncode  # fmt: skip
        wall = time.monotonic() - t0
    finally:
        head.stop()
    out = {"name": name, "batch": batch, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
           "loader_workers": loader_workers, "exit_code": rc, "wall_s": wall,
           "step_only_images_per_s": step_rate}  # fmt: skip
    if rc:
        out["log_tail"] = (workdir / "job.log").read_text(errors="replace")[-3000:]
        return out
    root = open_root(str(storage))
    records = [r for r in read_metrics(root.fs, root.job_prefix("bench", "gpucheck"))
               if r.get("type") == "step"]  # fmt: skip
    steady = [r for r in records if r["epoch"] >= 1]  # epoch 0 warms up (compilation, caches)
    train_s = sum(r["step_time_s"] for r in steady)
    out.update({
        "steps": len(records), "steady_steps": len(steady), "steady_train_s": train_s,
        "job_images_per_s": batch * len(steady) / train_s if train_s else None,
        "job_median_step_images_per_s": statistics.median(r["images_per_s"] for r in steady),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in records),
        "final_loss": records[-1]["loss"],
    })  # fmt: skip
    out["job_vs_step_only"] = out["job_images_per_s"] / step_rate
    return out


def markdown(res: dict) -> str:
    lines = [f"# GreenMIM device check: {res['device_name']}", "",
             f"torch {res['torch']}, timm {res['timm']}, {res['elapsed_s']:.0f} s in all", ""]  # fmt: skip
    ex = res.get("exactness", [])
    lines += [
        "## Exactness (fp32)",
        "",
        "| check | model | max abs err | tol | ok |",
        "|---|---|---|---|---|",
    ]
    for r in ex:
        err = "skipped: " + r["skipped"] if r.get("skipped") else f"{r['max_abs_err']:.2e}"
        lines.append(f"| {r['check']} | {r['model']} | {err} | {r['tol']} | {r['ok']} |")
    lines += ["", f"## Training step ({res['precision']}, mask 0.75)", "",
              "| model | batch | core | compile | step s (min-max) | img/s | SimMIM step s | step ratio "
              "| peak mem ratio | planner on thread | planner inline (before) | exec/visible tokens "
              "| host syncs/step |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res.get("steps", []):
        if "error" in r:
            lines.append(
                f"| {r['name']} | {r['batch']} | {r['backend']} | {r['compile']} | error: {r['error'][:120]} |"
            )
            continue
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['backend']} | {r['compile']} "
            f"| {r['step_s']:.4f} ({r['step_range'][0]:.4f}-{r['step_range'][1]:.4f}) "
            f"| {r['images_per_s']:.1f} | {r['baseline_step_s']:.4f} | {r['step_ratio']:.3f}x "
            f"| {r['memory_ratio']:.3f}x | {100 * r['planner_on_thread_share']:.2f} % "
            f"| {1e3 * r['planner_inline_s']:.1f} ms = {100 * r['planner_inline_share']:.1f} % "
            f"| {r['executed_tokens']}/{r['visible_tokens']} = {r['exec_per_visible']:.4f} "
            f"| {r['host_syncs_per_step'] if r['host_syncs_per_step'] is not None else 'n/a (CPU)'} |"
        )
        for site in r.get("sync_sites") or []:
            lines.append(f"|  | sync: {site[:200]} |")
    if res.get("steps"):
        lines += ["", f"memory: {res['steps'][0].get('memory_kind', '')}; "
                  "planner inline (before) = one plan on one CPU thread, as a share of (step + plan)"]  # fmt: skip
    job = res.get("job")
    if job:
        lines += ["", "## Ray Train job (one worker, built-in digits, real data loader)", ""]
        for k, v in job.items():
            if k != "log_tail":
                lines.append(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}")
        if "log_tail" in job:
            lines += ["", "```", job["log_tail"], "```"]
    for e in res.get("errors", []):
        lines += ["", "## Error", "", "```", e, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--runs", type=int, default=None, help="timed steps (default 25 GPU, 5 CPU)")
    p.add_argument("--job-seconds", type=float, default=None, help="default 120 GPU, 30 CPU")
    p.add_argument("--budget-s", type=float, default=430, help="whole run; parts shrink to fit")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # steady timings on a shared machine; the job's worker has 1 CPU
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu", file=sys.stderr)
        return 2
    res: dict = {
        "device": args.device, "torch": torch.__version__, "timm": timm.__version__,
        "device_name": torch.cuda.get_device_name(device) if cuda else "CPU",
        "precision": "bf16 autocast" if cuda else "fp32", "errors": [],
    }  # fmt: skip

    def save() -> None:
        res["elapsed_s"] = time.monotonic() - t0
        (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
        (out / "results.md").write_text(markdown(res))

    sections = [
        ("exactness", lambda: exactness(device)),
        ("steps", lambda: steps(device, GPU_CONFIGS if cuda else CPU_CONFIGS,
                                args.runs or (25 if cuda else 5), 5 if cuda else 1,
                                extra_until=t0 + 0.45 * args.budget_s)),
    ]  # fmt: skip
    for key, fn in sections:
        try:
            res[key] = fn()
        except Exception:
            res["errors"].append(f"{key}: {traceback.format_exc()}")
        save()
        print(f"[{time.monotonic() - t0:.0f}s] {key} done", flush=True)
    try:
        first = next(r for r in res.get("steps", []) if "step_s" in r)
        # Ray start, job setup, evaluation and export take about a minute besides training
        left = args.budget_s - (time.monotonic() - t0) - 75
        job_seconds = max(10.0, min(args.job_seconds or (120 if cuda else 30), left))
        res["job_seconds_target"] = job_seconds
        with tempfile.TemporaryDirectory(prefix="gm-check-") as tmp:
            res["job"] = ray_job(
                device, first["name"], first["batch"], first["images_per_s"],
                job_seconds, Path(tmp),
            )  # fmt: skip
    except Exception:
        res["errors"].append(f"job: {traceback.format_exc()}")
    save()
    print(markdown(res))
    return 0 if not res["errors"] and all(r["ok"] for r in res.get("exactness", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
