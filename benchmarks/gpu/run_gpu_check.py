"""One prepared GPU check of the Triton backend (issue 3): correctness, then fwd+bwd timings.

    python benchmarks/gpu/run_gpu_check.py            # one H100/H200, <= 8 minutes
    python benchmarks/gpu/run_gpu_check.py --quick    # CPU dry run, tiny shapes (TRITON_INTERPRET=1)

(a) Triton stats and gradients vs the float64 oracle `sdar_kernels.reference.reference_stats`
    for a few shapes, V = 151936 included (fp32: <= max(1e-5, 2x plain fp32 PyTorch's error)
    relative; 16-bit: no worse than plain 16-bit PyTorch + 1e-2).
(b) fwd+bwd of the SDAR loss at H = 4096, V = 151936, bf16, N in {4096, 16384} for: triton,
    torch-chunked, naive materialized PyTorch (fp32 logits), Liger chunked GRPO + fused-linear
    JSD (when importable), and a bare bf16 GEMM [N, H] x [H, V].
(c) A markdown table: ms, peak GiB, TFLOP/s over the GEMM passes of each design (pass = 2NHV
    FLOPs), and the fraction of the measured bare-GEMM rate; plus the memory target
    inputs + dL/dh + fp32 dL/dW. Nothing crashes the run: a failing case records its error.
Output: stdout, and $OUT/gpu_check.md + $OUT/gpu_check.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

if "--quick" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # CPU dry run: Triton kernels in the interpreter



def _ensure_importable() -> None:
    """Import sdar_kernels from this checkout even when the package is not installed
    (a bare GPU machine gets the working tree only): link kernels/ as sdar_kernels."""
    try:
        import sdar_kernels  # noqa: F401
        return
    except ImportError:
        pass
    import tempfile
    shim = Path(tempfile.mkdtemp(prefix="sdar_shim_"))
    (shim / "sdar_kernels").symlink_to(Path(__file__).resolve().parents[2] / "kernels")
    sys.path.insert(0, str(shim))


_ensure_importable()

import torch  # noqa: E402

from sdar_kernels import LossConfig, fused_linear_sdar_loss  # noqa: E402
from sdar_kernels.reference import reference_stats  # noqa: E402
from sdar_kernels.stats import StatsSpec  # noqa: E402

GIB = float(1 << 30)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


# ----------------------------------------------------------------------------- (a) correctness
def _rel(a: torch.Tensor, ref: torch.Tensor, grad: bool) -> float:
    if ref.numel() == 0:
        return 0.0
    denom = ref.abs().max().item() if grad else max(1.0, ref.abs().max().item())
    return (a.double() - ref.double()).abs().max().item() / max(denom, 1e-30)


def _oracle(args: dict, spec: StatsSpec, grads: tuple, dtype) -> dict:
    h = args["hidden"].detach().to(dtype or args["hidden"].dtype).requires_grad_(True)
    w = args["weight"].detach().to(dtype or args["weight"].dtype).requires_grad_(True)
    st = reference_stats(h, w, None, args["targets"], args["teacher_hidden"], args["teacher_weight"],
                         None, spec, dtype=dtype)
    outs = [st.logp, st.entropy, st.div]
    loss = sum((g.to(o.dtype) * o).sum() for g, o in zip(grads, outs) if g is not None and o is not None)
    dh, dw = torch.autograd.grad(loss, (h, w))
    return {"logp": st.logp.detach(), "entropy": st.entropy.detach() if st.entropy is not None else None,
            "div": st.div.detach() if st.div is not None else None, "dh": dh, "dw": dw}


def check_case(n: int, h: int, v: int, dtype: torch.dtype, div: str, device: str) -> dict:
    from sdar_kernels import triton_backend as tb
    g = torch.Generator(device="cpu").manual_seed(n * 7 + v)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device=device, dtype=dtype)  # noqa: E731
    teacher = div != "none"
    args = dict(hidden=mk(n, h), weight=mk(v, h, sc=3.0 / h ** 0.5),
                targets=torch.randint(0, v, (n,), generator=g).to(device),
                teacher_hidden=mk(n, h) if teacher else None,
                teacher_weight=mk(v, h, sc=3.0 / h ** 0.5) if teacher else None)
    spec = StatsSpec(temperature=0.8, with_entropy=True, divergence=div, jsd_beta=0.3)
    grads = tuple(torch.randn(n, generator=g).to(device) if k else None for k in (True, True, teacher))
    st = tb.stats_forward(args["hidden"], args["weight"], None, args["targets"], args["teacher_hidden"],
                          args["teacher_weight"], None, spec)
    dh, dw, _ = tb.stats_backward(args["hidden"], args["weight"], None, args["targets"],
                                  args["teacher_hidden"], args["teacher_weight"], None, spec, st,
                                  *grads, True, True, False)
    got = {"logp": st.logp, "entropy": st.entropy, "div": st.div, "dh": dh, "dw": dw}
    ref = _oracle(args, spec, grads, torch.float64)
    plain = _oracle(args, spec, grads, None)  # plain PyTorch in the input dtype
    worst, ok = {}, True
    for k, r in ref.items():
        if r is None:
            continue
        err = _rel(got[k], r, k in ("dh", "dw"))
        plain_err = _rel(plain[k], r, k in ("dh", "dw"))
        bound = max(1e-5, 2 * plain_err) if dtype == torch.float32 else plain_err + 1e-2
        worst[k] = f"{err:.1e}/{bound:.1e}"
        ok &= err <= bound and bool(torch.isfinite(got[k]).all())
    return {"case": f"N={n} H={h} V={v} {str(dtype)[6:]} {div}", "ok": ok, "errors (err/bound)": worst}


def run_correctness(quick: bool, device: str) -> list[dict]:
    if quick:
        shapes = [(33, 31, 1001, torch.float32, "reverse_kl"), (20, 64, 515, torch.bfloat16, "jsd")]
    else:
        shapes = [(256, 896, 151936, torch.float32, "reverse_kl"),
                  (256, 4096, 151936, torch.bfloat16, "none"),
                  (192, 1536, 151936, torch.bfloat16, "jsd"),
                  (77, 31, 1001, torch.bfloat16, "forward_kl"),
                  (300, 2048, 32000, torch.float16, "reverse_kl")]
    rows = []
    for n, h, v, dt, div in shapes:
        t0 = time.time()
        try:
            row = check_case(n, h, v, dt, div, device)
        except Exception as exc:  # noqa: BLE001 - recorded, never fatal
            row = {"case": f"N={n} H={h} V={v} {str(dt)[6:]} {div}", "ok": False, "error": short_error(exc)}
            traceback.print_exc()
        row["s"] = round(time.time() - t0, 1)
        log(f"check {row}")
        rows.append(row)
        _free()
    return rows


# ----------------------------------------------------------------------------- (b) timings
def _free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _problem(n: int, h: int, v: int, device: str, teacher: bool) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    bf = torch.bfloat16
    p = dict(hidden=(torch.randn(n, h, generator=g) * 1.0).to(device, bf),
             weight=(torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)).to(device, bf),
             targets=torch.randint(0, v, (n,), generator=g).to(device),
             advantages=torch.randn(n, generator=g).to(device),
             old=(-torch.rand(n, generator=g) * 3).to(device),
             teacher=(-torch.rand(n, generator=g) * 3).to(device),
             ref=(-torch.rand(n, generator=g) * 3).to(device),
             mask=torch.ones(n, device=device))
    if teacher:
        p["teacher_hidden"] = (torch.randn(n, h, generator=g)).to(device, bf)
        p["teacher_weight"] = p["weight"].detach().clone()
    return p


def _sdar_step(p: dict, cfg: LossConfig):
    def step():
        hid = p["hidden"].detach().requires_grad_(True)
        w = p["weight"].detach().requires_grad_(True)
        full = cfg.full_vocab_divergence
        out = fused_linear_sdar_loss(hid, w, p["targets"], p["advantages"], p["old"], p["mask"],
                                     teacher_logprobs=p["teacher"], ref_logprobs=p["ref"],
                                     teacher_hidden=p.get("teacher_hidden") if full else None,
                                     teacher_weight=p.get("teacher_weight") if full else None,
                                     config=cfg)
        out.loss.backward()
        return hid.grad, w.grad
    return step


def _gemm_step(p: dict):
    w_t = p["weight"].t()
    return lambda: torch.mm(p["hidden"], w_t)


def _liger_step(p: dict, which: str):
    """Liger-Kernel chunked GRPO (policy only) or fused-linear JSD (student vs teacher)."""
    n, h = p["hidden"].shape
    t = min(1024, n)
    b = n // t
    if which == "grpo":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)

        def step():
            hid = p["hidden"].detach().view(b, t, h).requires_grad_(True)
            w = p["weight"].detach().requires_grad_(True)
            loss, _ = fn(hid, w, p["targets"].view(b, t), torch.ones(b, t, device=hid.device),
                         p["advantages"].view(b, t)[:, 0].contiguous(),
                         old_per_token_logps=p["old"].view(b, t))
            loss.backward()
        return step
    from liger_kernel.transformers import LigerFusedLinearJSD
    fn = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)

    def step():
        hid = p["hidden"].detach().requires_grad_(True)
        w = p["weight"].detach().requires_grad_(True)
        loss = fn(hid, w, p["teacher_hidden"], p["teacher_weight"])
        loss.backward()
    return step


def time_step(step, reps: int, device: str, input_bytes: int) -> tuple[float, float]:
    """(median ms over reps after one warm-up, peak GiB): the peak is the memory the step
    allocates on top of what was resident before it, plus the bytes of the inputs it reads
    (so that tensors prepared for other designs do not count)."""
    step()
    cuda = device == "cuda"
    base = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base + input_bytes) / GIB if cuda else float("nan")
    return sorted(times)[len(times) // 2], peak


# GEMM passes (each 2*N*H*V FLOPs) per design, fwd+bwd:
#   triton (recompute backward): student fwd + recompute + dL/dh + dL/dW = 4; a full-vocab
#   teacher adds 2 (its tile in the forward and again in the recompute);
#   torch-chunked (LossConfig.grad_in_forward, the default): fwd + dh + dW = 3, teacher +1;
#   naive materialized: fwd + dh + dW = 3; Liger chunked GRPO (recompute backward) 4;
#   Liger fused-linear JSD (grads in forward) 2 + 2.
DESIGNS = [
    # name, builder, gemm passes, needs teacher tensors
    ("triton sdar (sampled)", lambda p: _sdar_step(p, LossConfig.preset("sdar", backend="triton")), 4, False),
    ("triton sdar reverse_kl", lambda p: _sdar_step(p, LossConfig.preset("sdar", backend="triton", divergence="reverse_kl")), 6, True),
    ("torch-chunked sdar (sampled)", lambda p: _sdar_step(p, LossConfig.preset("sdar", backend="torch")), 3, False),
    ("torch-chunked sdar reverse_kl", lambda p: _sdar_step(p, LossConfig.preset("sdar", backend="torch", divergence="reverse_kl")), 4, True),
    ("naive materialized fp32 (sampled)", lambda p: _sdar_step(p, LossConfig.preset("sdar", backend="reference", reference_dtype="float32")), 3, False),
    ("liger chunked GRPO", lambda p: _liger_step(p, "grpo"), 4, False),
    ("liger fused-linear JSD", lambda p: _liger_step(p, "jsd"), 4, True),
]


def input_bytes(p: dict, teacher: bool) -> int:
    names = ["hidden", "weight"] + (["teacher_hidden", "teacher_weight"] if teacher else [])
    return sum(p[k].numel() * p[k].element_size() for k in names)


def memory_target_gib(n: int, h: int, v: int, teacher: bool) -> float:
    """inputs (h, W[, teacher h, teacher W]) in bf16 + dL/dh bf16 + fp32 dL/dW, in GiB."""
    inputs = 2 * (n * h + v * h + ((n * h + v * h) if teacher else 0))
    return (inputs + 2 * n * h + 4 * v * h) / GIB


def run_timings(quick: bool, device: str, designs_filter: str | None, budget_s: float) -> list[dict]:
    deadline = time.time() + budget_s
    h, v = (64, 1000) if quick else (4096, 151936)
    sizes = (64, 128) if quick else (4096, 16384)
    reps = 1 if quick else 3
    rows = []
    for n in sizes:
        p = None
        try:
            p = _problem(n, h, v, device, teacher=True)
            ms, peak = time_step(_gemm_step(p), reps, device, input_bytes(p, False))
            gemm_rate = 2 * n * h * v / (ms * 1e-3) / 1e12
            rows.append(dict(N=n, design="bare bf16 GEMM [N,H]x[H,V]", ms=ms, peak=peak, passes=1,
                             tflops=gemm_rate, frac=1.0, target=float("nan"), error=""))
        except Exception as exc:  # noqa: BLE001
            gemm_rate = float("nan")
            rows.append(dict(N=n, design="bare bf16 GEMM", error=short_error(exc)))
        log(f"N={n} gemm {rows[-1]}")
        for name, build, passes, teacher in DESIGNS:
            if designs_filter and designs_filter not in name:
                continue
            row = dict(N=n, design=name, passes=passes, target=memory_target_gib(n, h, v, teacher))
            if time.time() > deadline:
                row.update(error=f"skipped: past the {budget_s:.0f} s time budget")
                rows.append(row)
                continue
            try:
                ms, peak = time_step(build(p), reps, device, input_bytes(p, teacher))
                rate = passes * 2 * n * h * v / (ms * 1e-3) / 1e12
                row.update(ms=ms, peak=peak, tflops=rate, frac=rate / gemm_rate, error="")
            except Exception as exc:  # noqa: BLE001 - OOM, missing package, API drift: recorded
                row.update(error=short_error(exc))
            log(f"N={n} {row}")
            rows.append(row)
            _free()
        del p
        _free()
    return rows


# ----------------------------------------------------------------------------- (c) report
def _fmt(x, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def markdown(device_name: str, checks: list[dict], rows: list[dict]) -> str:
    lines = [f"## Triton GPU check on {device_name} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", "### (a) correctness vs float64 reference", "",
             "| case | ok | errors (err/bound) | s |", "|---|---|---|---|"]
    for c in checks:
        detail = c.get("error") or ", ".join(f"{k} {v}" for k, v in c.get("errors (err/bound)", {}).items())
        lines.append(f"| {c['case']} | {'PASS' if c['ok'] else 'FAIL'} | {detail} | {c.get('s', '-')} |")
    lines += ["", "### (b, c) fwd+bwd, H=4096, V=151936, bf16 (median of 3 after warm-up)", "",
              "| N | design | ms | peak GiB | target GiB | GEMM passes | TFLOP/s | frac of GEMM | error |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N']} | {r['design']} | {_fmt(r.get('ms'), '.1f')} | {_fmt(r.get('peak'), '.2f')} "
                     f"| {_fmt(r.get('target'), '.2f')} | {r.get('passes', '-')} | {_fmt(r.get('tflops'), '.0f')} "
                     f"| {_fmt(r.get('frac'), '.2f')} | {r.get('error', '')} |")
    lines += ["", "target GiB = inputs + dL/dh + fp32 dL/dW (issue 3 asks peak <= 1.1x target at N=16384)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU dry run with tiny shapes")
    ap.add_argument("--only", default=None, help="time only designs whose name contains this")
    ap.add_argument("--skip-check", action="store_true", help="skip part (a)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip the remaining timings once this many seconds have passed")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    log(f"device={name} torch={torch.__version__} quick={args.quick}")
    if device == "cpu" and not args.quick:
        log("no CUDA device: use --quick for a CPU dry run")
        return 2
    t0 = time.time()
    checks = [] if args.skip_check else run_correctness(args.quick, device)
    rows = run_timings(args.quick, device, args.only, args.budget_s - (time.time() - t0))
    text = markdown(name, checks, rows)
    print(text, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_check.md").write_text(text + "\n")
        Path(out, "gpu_check.json").write_text(json.dumps({"device": name, "checks": checks, "rows": rows},
                                                          indent=1, default=str))
    log(f"done in {time.time() - t0:.0f} s; correctness {'PASS' if all(c['ok'] for c in checks) else 'FAIL'}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
