"""GPU check for the in-process backends: ONNX (CUDA provider) and torch on CUDA vs CPU.

Builds one MLP (numpy weights -> an ONNX file and a TorchScript file with the same
weights), serves it through OnnxBackend and TorchBackend on ``cpu`` and ``cuda``, and for
each prints which device/provider actually ran, throughput at a fixed batch size, and the
largest difference from a float64 numpy oracle. Outputs of every runtime must agree.

Needs, on the GPU machine: ``pip install 'mirrorgate[gpu]'`` (onnxruntime-gpu instead of
onnxruntime) and a CUDA build of torch. Run from the repository root:

    python benchmarks/gpu_check.py --require-cuda            # fail if CUDA is not used
    python benchmarks/gpu_check.py --batch-size 256 --seconds 3 --json

Exit code: 0 all agree (and CUDA ran, with --require-cuda); 1 outputs disagree or a run
failed; 2 --require-cuda and a CUDA runtime did not run on the GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.core.config import BackendSettings  # noqa: E402
from proxy.core.errors import MirrorgateError  # noqa: E402
from tests.proxy.models import INPUT, PROBS, build_onnx_mlp, mlp_oracle  # noqa: E402


def build_torchscript_mlp(path: Path, params: list[np.ndarray]) -> None:
    import torch
    from torch import nn

    w1, b1, w2, b2 = (torch.from_numpy(np.ascontiguousarray(p)) for p in params)
    first, second = nn.Linear(*w1.shape), nn.Linear(*w2.shape)
    with torch.no_grad():
        first.weight.copy_(w1.T)
        first.bias.copy_(b1)
        second.weight.copy_(w2.T)
        second.bias.copy_(b2)
    module = nn.Sequential(first, nn.ReLU(), second, nn.Softmax(dim=1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated
        torch.jit.save(torch.jit.script(module), str(path))
    n_features, n_classes = params[0].shape[0], params[2].shape[1]
    io = {
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, n_features]}],
        "outputs": [{"name": PROBS, "datatype": "FP32", "shape": [-1, n_classes]}],
    }
    path.with_suffix(".io.json").write_text(json.dumps(io))


async def run_one(settings: BackendSettings, x: np.ndarray, seconds: float) -> dict[str, Any]:
    from proxy.backends.factory import create_backend

    try:
        backend = await create_backend(settings)
    except MirrorgateError as exc:
        return {"ok": False, "error": exc.message}
    try:
        out = (await backend.infer({INPUT: x}))[PROBS]  # also the warm-up (CUDA init, ...)
        runs = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            await backend.infer({INPUT: x})
            runs += 1
        elapsed = time.perf_counter() - start
        identity = backend.identity
        return {
            "ok": True,
            "device": identity.device,
            "provider": identity.extra.get("provider", identity.extra.get("format", "")),
            "rows_per_s": runs * x.shape[0] / elapsed,
            "ms_per_batch": 1000.0 * elapsed / max(runs, 1),
            "output": out,
        }
    except MirrorgateError as exc:
        return {"ok": False, "error": exc.message}
    finally:
        await backend.aclose()


async def main_async(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="mirrorgate-gpu-"))
    onnx_path, ts_path = tmp / "mlp.onnx", tmp / "mlp.pt"
    params = build_onnx_mlp(onnx_path, args.features, args.hidden, args.classes, seed=0)
    runs: dict[str, BackendSettings] = {
        f"onnx-{d}": BackendSettings(name=f"onnx-{d}", kind="onnx", path=str(onnx_path), device=d)
        for d in ("cpu", "cuda")
    }
    try:
        build_torchscript_mlp(ts_path, params)
        for d in ("cpu", "cuda"):
            runs[f"torch-{d}"] = BackendSettings(
                name=f"torch-{d}", kind="torch", path=str(ts_path), device=d
            )
    except ImportError:
        print("torch is not installed: torch runs skipped", file=sys.stderr)
    x = np.random.default_rng(1).normal(size=(args.batch_size, args.features)).astype(np.float32)
    oracle = mlp_oracle(params, x)
    report: dict[str, Any] = {"config": vars(args), "runs": {}}
    code = 0
    outputs: dict[str, np.ndarray] = {}
    for name, settings in runs.items():
        result = await run_one(settings, x, args.seconds)
        if result["ok"]:
            out = result.pop("output")
            outputs[name] = out
            result["max_abs_err_vs_numpy"] = float(np.abs(out - oracle).max())
            if result["max_abs_err_vs_numpy"] > args.tolerance:
                code = 1
        elif name.endswith("-cpu"):
            code = 1
        report["runs"][name] = result
    names = sorted(outputs)
    report["max_abs_diff_between_runtimes"] = max(
        (float(np.abs(outputs[a] - outputs[b]).max()) for a in names for b in names), default=0.0
    )
    if report["max_abs_diff_between_runtimes"] > args.tolerance:
        code = 1
    cuda_ok = [
        n for n, r in report["runs"].items() if n.endswith("-cuda") and r.get("device") == "cuda"
    ]
    report["cuda_runs_on_gpu"] = cuda_ok
    if args.require_cuda and code == 0 and len(cuda_ok) < sum(n.endswith("-cuda") for n in runs):
        code = 2
    return code, report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--features", type=int, default=512)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--seconds", type=float, default=2.0, help="timed run per backend")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |probability diff|")
    p.add_argument("--require-cuda", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    code, report = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"MLP {args.features}-{args.hidden}-{args.classes}, batch {args.batch_size}")
        print(
            f"{'run':<11} {'device':<7} {'provider/format':<22} {'rows/s':>12} {'ms/batch':>9} "
            f"{'max|err|':>9}"
        )
        for name, r in report["runs"].items():
            if r["ok"]:
                print(
                    f"{name:<11} {r['device']:<7} {r['provider']:<22} {r['rows_per_s']:>12,.0f} "
                    f"{r['ms_per_batch']:>9.3f} {r['max_abs_err_vs_numpy']:>9.1e}"
                )
            else:
                print(f"{name:<11} unavailable: {r['error']}")
        print(
            f"max |diff| between runtimes: {report['max_abs_diff_between_runtimes']:.1e}; "
            f"CUDA used by: {', '.join(report['cuda_runs_on_gpu']) or 'none'}; exit {code}"
        )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
