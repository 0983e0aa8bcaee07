"""Correctness of our Triton paths against the float64 oracle, and bitwise determinism.

Errors are max |got - ref| / max |ref| (gradients) or / max(1, max |ref|) (values), ref the
float64 oracle on the same (16-bit rounded) inputs. Bounds: fp32 max(1e-5, 2 x plain fp32
PyTorch's error); 16-bit plain 16-bit PyTorch's error + 1e-2 (the Cut Cross-Entropy criterion:
no worse than the framework in the input dtype).

  stats_check  Triton statistics forward + recompute backward (triton_backend.stats_*) per token
  loss_check   the public fused_linear_sdar_loss (preset sdar) per path: "recompute",
               "3-pass", "hopper" (recompute with SDAR_TRITON_VARIANT=hopper); loss, dL/dh, dL/dW
  determinism  each path twice on the same inputs: torch.equal of loss, dL/dh, dL/dW (only a
               GPU run says something: the CPU interpreter is deterministic anyway)
"""
from __future__ import annotations

import time
import traceback
from typing import Callable

import torch

from . import designs

PATHS = ("recompute", "3-pass", "hopper")


def short_error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def _rel(a: torch.Tensor, ref: torch.Tensor, grad: bool) -> float:
    if ref.numel() == 0:
        return 0.0
    denom = ref.abs().max().item() if grad else max(1.0, ref.abs().max().item())
    return (a.double() - ref.double()).abs().max().item() / max(denom, 1e-30)


def _bound(plain_err: float, dtype: torch.dtype) -> float:
    return max(1e-5, 2 * plain_err) if dtype == torch.float32 else plain_err + 1e-2


def _judge(got: dict, ref: dict, plain: dict, dtype: torch.dtype) -> tuple[bool, dict]:
    worst, ok = {}, True
    for k, r in ref.items():
        if r is None:
            continue
        grad = k in ("dh", "dw")
        err, bound = _rel(got[k], r, grad), _bound(_rel(plain[k], r, grad), dtype)
        worst[k] = f"{err:.1e}/{bound:.1e}"
        ok &= err <= bound and bool(torch.isfinite(got[k]).all())
    return ok, worst


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, teacher: bool, seed: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device=device, dtype=dtype)  # noqa: E731
    return dict(hidden=mk(n, h), weight=mk(v, h, sc=3.0 / h ** 0.5),
                targets=torch.randint(0, v, (n,), generator=g).to(device),
                teacher_hidden=mk(n, h) if teacher else None,
                teacher_weight=mk(v, h, sc=3.0 / h ** 0.5) if teacher else None, gen=g)


# ----------------------------------------------------------------------------- stats kernels
def _stats_oracle(args: dict, spec, grads: tuple, dtype) -> dict:
    from sdar_kernels.reference import reference_stats

    h = args["hidden"].detach().to(dtype or args["hidden"].dtype).requires_grad_(True)
    w = args["weight"].detach().to(dtype or args["weight"].dtype).requires_grad_(True)
    st = reference_stats(h, w, None, args["targets"], args["teacher_hidden"], args["teacher_weight"],
                         None, spec, dtype=dtype)
    outs = [st.logp, st.entropy, st.div]
    loss = sum((g.to(o.dtype) * o).sum() for g, o in zip(grads, outs) if g is not None and o is not None)
    dh, dw = torch.autograd.grad(loss, (h, w))
    return {"logp": st.logp.detach(), "entropy": st.entropy.detach() if st.entropy is not None else None,
            "div": st.div.detach() if st.div is not None else None, "dh": dh, "dw": dw}


def stats_check(n: int, h: int, v: int, dtype: torch.dtype, div: str, device: str) -> dict:
    """Triton stats_forward / stats_backward (per-token upstream gradients) vs the oracle."""
    from sdar_kernels import triton_backend as tb
    from sdar_kernels.stats import StatsSpec

    teacher = div != "none"
    args = _inputs(n, h, v, dtype, device, teacher, seed=n * 7 + v)
    g = args.pop("gen")
    spec = StatsSpec(temperature=0.8, with_entropy=True, divergence=div, jsd_beta=0.3)
    grads = tuple(torch.randn(n, generator=g).to(device) if k else None for k in (True, True, teacher))
    st = tb.stats_forward(args["hidden"], args["weight"], None, args["targets"], args["teacher_hidden"],
                          args["teacher_weight"], None, spec)
    dh, dw, _ = tb.stats_backward(args["hidden"], args["weight"], None, args["targets"],
                                  args["teacher_hidden"], args["teacher_weight"], None, spec, st,
                                  *grads, True, True, False)
    got = {"logp": st.logp, "entropy": st.entropy, "div": st.div, "dh": dh, "dw": dw}
    ok, worst = _judge(got, _stats_oracle(args, spec, grads, torch.float64),
                       _stats_oracle(args, spec, grads, None), dtype)
    return {"case": f"stats N={n} H={h} V={v} {str(dtype)[6:]} {div}", "ok": ok, "errors (err/bound)": worst}


# ----------------------------------------------------------------------------- public loss per path
def _loss_problem(n: int, h: int, v: int, dtype: torch.dtype, device: str) -> dict:
    args = _inputs(n, h, v, dtype, device, False, seed=n * 11 + v)
    g = args.pop("gen")
    base = -torch.rand(n, generator=g) * 3
    mask = (torch.rand(n, generator=g) > 0.2).float()
    mask[: max(1, n // 8)] = 0  # a masked prompt block
    return dict(hidden=args["hidden"], weight=args["weight"], targets=args["targets"],
                advantages=torch.randn(n, generator=g).to(device),
                old=(base + 0.3 * torch.randn(n, generator=g)).to(device),
                teacher=(base + torch.randn(n, generator=g)).to(device),
                ref=(base + 0.1 * torch.randn(n, generator=g)).to(device), mask=mask.to(device))


def path_step(p: dict, path: str, device: str, cfg_overrides: dict | None = None) -> Callable:
    """The verified step of one of our PATHS on problem ``p`` (fwd+bwd, returns loss, dh, dw)."""
    if path not in PATHS:
        raise ValueError(f"path={path!r} is invalid; expected one of {PATHS}")
    three = path == "3-pass"
    cfg = designs.sdar_config("triton", three).replace(**(cfg_overrides or {}))
    step = designs.sdar_step(p, cfg, "hopper" if path == "hopper" else None, device)
    return designs.verified(step, three)


def loss_check(path: str, n: int, h: int, v: int, dtype: torch.dtype, device: str) -> dict:
    """fused_linear_sdar_loss on ``path`` vs backend="reference" (float64 and the input dtype)."""
    p = _loss_problem(n, h, v, dtype, device)
    loss, dh, dw = path_step(p, path, device)()
    got = {"loss": loss, "dh": dh, "dw": dw}
    refs = []
    for ref_dtype in ("float64", "input"):
        ref_step = designs.sdar_step(p, designs.sdar_config("reference", False).replace(reference_dtype=ref_dtype),
                                     None, device)
        r_loss, r_dh, r_dw = ref_step()
        refs.append({"loss": r_loss, "dh": r_dh, "dw": r_dw})
    ok, worst = _judge(got, refs[0], refs[1], dtype)
    return {"case": f"loss {path} N={n} H={h} V={v} {str(dtype)[6:]}", "ok": ok, "errors (err/bound)": worst}


def determinism_check(path: str, n: int, h: int, v: int, device: str) -> dict:
    """Two calls of ``path`` on the same bf16 problem: bitwise equal loss, dL/dh, dL/dW?"""
    p = designs.make_problem(n, h, v, device, teacher=False)
    step = path_step(p, path, device)
    a = step()
    b = step()
    same = {k: bool(torch.equal(x, y)) for k, x, y in zip(("loss", "dh", "dw"), a, b)}
    return {"case": f"determinism {path} N={n} H={h} V={v} bf16", "ok": all(same.values()),
            "errors (err/bound)": {k: "equal" if s else "DIFFERS" for k, s in same.items()}}


def inplace_dz_check(c: int, v: int, dtype: torch.dtype, div: int, device: str) -> dict:
    """The 3-pass path's row kernel writing 16-bit dL/dz over its own fp32 logits rows (aliased,
    warps racing on a GPU: the debug_barrier must order them) equals the same kernel writing to a
    separate buffer, bit for bit. The interpreter runs a block's loads before its stores, so only a
    GPU run can fail this."""
    from sdar_kernels.triton_backend import rows

    g = torch.Generator(device="cpu").manual_seed(7)
    z = (torch.randn(c, v, generator=g) * 4).to(device)
    zt = (torch.randn(c, v, generator=g) * 4).to(device) if div else None
    y = torch.randint(0, v, (c,), generator=g).to(device)
    grads = [torch.randn(c, generator=g).to(device) for _ in range(3)]
    config = rows.row_config(v, bool(div))
    st = torch.empty((8, c), device=device)
    rows.row_stats_kernel[(c,)](z, zt if div else z, z, z, y, st, v, v, c, 1.0, 0.5, BV=config.block_v,
                                HAS_BIAS=False, HAS_TBIAS=False, DIV=div, **config.launch())
    separate = torch.empty((c, v), device=device, dtype=dtype)
    rows.launch_dlogits(z, zt, None, None, y, st, *grads[:2], grads[2] if div else None, separate, div,
                        1.0, 0.5, config, aliased=False)
    buf = z.clone()
    rows.launch_dlogits(buf, zt, None, None, y, st, *grads[:2], grads[2] if div else None,
                        buf.view(dtype), div, 1.0, 0.5, config, aliased=True)
    same = bool(torch.equal(buf.view(dtype)[:, :v], separate))
    return {"case": f"in-place dz C={c} V={v} {str(dtype)[6:]} div={div}", "ok": same,
            "errors (err/bound)": {"dz": "equal" if same else "DIFFERS"}}


# ----------------------------------------------------------------------------- driver
def plan(quick: bool) -> list[tuple[str, Callable[[str], dict]]]:
    """(label, fn(device) -> row) in run order: stats, public loss per path, determinism."""
    bf, f32 = torch.bfloat16, torch.float32
    if quick:
        stats = [(33, 31, 123, f32, "reverse_kl"), (20, 32, 200, bf, "jsd")]
        losses = [(17, 31, 123, f32), (24, 32, 200, bf)]
        det = (16, 32, 200)
    else:
        stats = [(256, 4096, 151936, bf, "none"), (256, 896, 151936, f32, "reverse_kl"),
                 (192, 1536, 151936, bf, "jsd"), (77, 31, 1001, bf, "forward_kl")]
        losses = [(77, 31, 1001, bf), (256, 4096, 151936, bf), (33, 31, 123, f32)]
        det = (4096, 4096, 151936)
    out = []
    for n, h, v, dt, div in stats:
        out.append((f"stats N={n} H={h} V={v} {str(dt)[6:]} {div}",
                    lambda d, a=(n, h, v, dt, div): stats_check(*a, d)))
    for n, h, v, dt in losses:
        for path in PATHS:
            out.append((f"loss {path} N={n} H={h} V={v} {str(dt)[6:]}",
                        lambda d, a=(path, n, h, v, dt): loss_check(*a, d)))
    for path in PATHS:
        out.append((f"determinism {path} N={det[0]} H={det[1]} V={det[2]} bf16",
                    lambda d, a=(path, *det): determinism_check(*a, d)))
    c, v = (9, 300) if quick else (64, 151936)
    for dt, div in ((bf, 0), (torch.float16, 1), (bf, 3)):
        out.append((f"in-place dz C={c} V={v} {str(dt)[6:]} div={div}",
                    lambda d, a=(c, v, dt, div): inplace_dz_check(*a, d)))
    return out


def run_checks(quick: bool, device: str, deadline: float, log: Callable[[str], None]) -> list[dict]:
    """Every planned check; past ``deadline`` (time.time()) the rest are recorded as skipped."""
    rows = []
    for label, fn in plan(quick):
        if time.time() > deadline:
            rows.append({"case": label, "ok": None, "error": "skipped: past the check time budget"})
            continue
        t0 = time.time()
        try:
            row = fn(device)
        except Exception as exc:  # noqa: BLE001 - recorded, never fatal
            row = {"case": label, "ok": False, "error": short_error(exc)}
            traceback.print_exc()
        row["s"] = round(time.time() - t0, 1)
        log(f"check {row}")
        rows.append(row)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows
