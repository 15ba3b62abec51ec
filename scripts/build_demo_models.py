#!/usr/bin/env python3
"""Build the demo's data pool and three ONNX models, reproducibly (fixed seeds, seconds).

    python scripts/build_demo_models.py                # into proxy/demo/assets + examples/models
    python scripts/build_demo_models.py --out DIR      # somewhere else (tests rebuild this way)

Needs the dev dependencies scikit-learn (the bundled digits data set) and onnx (the
graph builder); the shipped files need only numpy and onnxruntime. The story
(docs/demo.md):

- the data: scikit-learn's ``load_digits`` (UCI optical digits), split once into a
  training set (60 %) and a held-out set (40 %) by a seeded permutation;
- the slices: the platform that captured the image (``proxy.demo.capture``); every
  training image is captured on one platform drawn from the production mix, every
  held-out image on all three platforms (the traffic pool);
- ``champion``: last release, a softmax regression trained on the production mix;
- ``candidate_regressed``: a one-hidden-layer MLP retrained on an export in which the
  mobile captures are missing (a broken upload path kept them out of the labelling
  queue): better on web and tablet, and so on aggregate, but clearly worse on mobile;
- ``candidate_good``: the same MLP trained on the full production mix.

Training is full-batch L-BFGS (scipy) from seeded initial weights in float64, exported as
float32 ONNX graphs built with ``onnx.helper``: MatMul/Add(/Relu/MatMul/Add)/Softmax,
input ``features`` FP32 [-1, 64] (raw pixel counts 0..16; the 1/16 input scaling is
folded into the first weight matrix), output ``probabilities`` FP32 [-1, 10].
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.demo import assets  # noqa: E402
from proxy.demo.capture import N_FEATURES, PIXEL_MAX, PLATFORMS, render_many  # noqa: E402
from proxy.demo.offline import OfflineModel, file_sha256  # noqa: E402

SPLIT_SEED = 0
TRAIN_PLATFORM_SEED = 3
INIT_SEED = 1  # see docs/demo.md, "Models": seeds 0-3 compared on the per-class check
TRAIN_FRACTION = 0.6
# Production traffic mix, used for the training captures and the "mix" accuracy; the
# traffic scenarios (proxy.demo.traffic) default to the same mix.
PRODUCTION_MIX = {"web": 0.6, "mobile": 0.2, "tablet": 0.2}
CHAMPION_L2 = 5e-3
MLP_HIDDEN = 48
MLP_L2 = 1e-4
MLP_MAX_ITER = 300
OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime >= 1.17 (pyproject's floor)

Predictor = Callable[[np.ndarray], np.ndarray]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def fit_softmax_regression(x: np.ndarray, y: np.ndarray, l2: float) -> list[np.ndarray]:
    """Multinomial logistic regression; returns [W, b] on inputs scaled to [0, 1]."""
    k = assets.N_CLASSES
    a = x / PIXEL_MAX
    t = np.eye(k)[y]
    d = a.shape[1]

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        weights, bias = w[: d * k].reshape(d, k), w[d * k :]
        p = _softmax(a @ weights + bias)
        value = -np.log(p[t == 1] + 1e-12).mean() + l2 * (weights**2).sum()
        g = (p - t) / len(a)
        grad = np.concatenate([(a.T @ g + 2 * l2 * weights).ravel(), g.sum(axis=0)])
        return float(value), grad

    res = optimize.minimize(
        loss, np.zeros(d * k + k), jac=True, method="L-BFGS-B", options={"maxiter": 500}
    )
    return [res.x[: d * k].reshape(d, k), res.x[d * k :]]


def fit_mlp(x: np.ndarray, y: np.ndarray, hidden: int, l2: float, seed: int) -> list[np.ndarray]:
    """One hidden ReLU layer; returns [W1, b1, W2, b2] on inputs scaled to [0, 1]."""
    k = assets.N_CLASSES
    a = x / PIXEL_MAX
    t = np.eye(k)[y]
    d = a.shape[1]
    shapes = [(d, hidden), (hidden,), (hidden, k), (k,)]
    rng = np.random.default_rng(seed)
    w0 = np.concatenate(
        [
            rng.normal(0.0, 1.0 / np.sqrt(d), d * hidden),
            np.zeros(hidden),
            rng.normal(0.0, 1.0 / np.sqrt(hidden), hidden * k),
            np.zeros(k),
        ]
    )

    def unpack(w: np.ndarray) -> list[np.ndarray]:
        out, offset = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            out.append(w[offset : offset + size].reshape(shape))
            offset += size
        return out

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        w1, b1, w2, b2 = unpack(w)
        pre = a @ w1 + b1
        h = np.maximum(pre, 0.0)
        p = _softmax(h @ w2 + b2)
        value = -np.log(p[t == 1] + 1e-12).mean() + l2 * ((w1**2).sum() + (w2**2).sum())
        g = (p - t) / len(a)
        gh = (g @ w2.T) * (pre > 0)
        grad = np.concatenate(
            [
                (a.T @ gh + 2 * l2 * w1).ravel(),
                gh.sum(axis=0),
                (h.T @ g + 2 * l2 * w2).ravel(),
                g.sum(axis=0),
            ]
        )
        return float(value), grad

    res = optimize.minimize(
        loss, w0, jac=True, method="L-BFGS-B", options={"maxiter": MLP_MAX_ITER}
    )
    return unpack(res.x)


def export_onnx(params: list[np.ndarray], path: Path, doc: str) -> None:
    """Write a float32 ONNX classifier; the 1/16 input scaling is folded into W1."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    first = (params[0] / PIXEL_MAX).astype(np.float32)
    weights = [first, *(p.astype(np.float32) for p in params[1:])]
    names = ["W1", "b1", "W2", "b2"][: len(weights)]
    inits = [numpy_helper.from_array(w, name) for w, name in zip(weights, names, strict=True)]
    nodes = [
        helper.make_node("MatMul", [assets.INPUT_NAME, "W1"], ["z1"]),
        helper.make_node("Add", ["z1", "b1"], ["a1"]),
    ]
    logits = "a1"
    if len(weights) == 4:
        nodes += [
            helper.make_node("Relu", ["a1"], ["h1"]),
            helper.make_node("MatMul", ["h1", "W2"], ["z2"]),
            helper.make_node("Add", ["z2", "b2"], ["a2"]),
        ]
        logits = "a2"
    nodes.append(helper.make_node("Softmax", [logits], [assets.OUTPUT_NAME], axis=-1))
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info(assets.INPUT_NAME, TensorProto.FLOAT, [-1, N_FEATURES])],
        [
            helper.make_tensor_value_info(
                assets.OUTPUT_NAME, TensorProto.FLOAT, [-1, assets.N_CLASSES]
            )
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="mirrorgate-demo",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return np.asarray(data.data, dtype=np.float64), np.asarray(data.target, dtype=np.int64)


def evaluate(model: OfflineModel, pool: assets.DemoPool) -> dict[str, Any]:
    """Held-out accuracy per platform (exact counts) and at the production mix."""
    correct = model.predict(pool.features) == pool.labels
    per: dict[str, dict[str, float | int]] = {}
    for platform in PLATFORMS:
        rows = pool.rows_of(platform)
        per[platform] = {
            "n": int(rows.size),
            "correct": int(correct[rows].sum()),
            "accuracy": round(float(correct[rows].mean()), 4),
        }
    mix = sum(PRODUCTION_MIX[p] * float(per[p]["accuracy"]) for p in PLATFORMS)
    return {
        "per_platform": per,
        "pool_accuracy": round(float(correct.mean()), 4),
        "mix_accuracy": round(mix, 4),
    }


def build(out: Path) -> dict[str, Any]:
    """Write pool, models and manifest into ``out``; returns the manifest."""
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    # One BLAS thread: the thread count changes floating-point summation order, and the
    # MLP's optimiser would amplify that into different weights from run to run.
    with threadpool_limits(limits=1):
        return _build(out)


def _build(out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    x, y = _load_digits()
    n = len(y)
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_train = round(n * TRAIN_FRACTION)
    train, held = np.sort(perm[:n_train]), np.sort(perm[n_train:])

    # Training captures: one platform per image, drawn from the production mix.
    mix = np.array([PRODUCTION_MIX[p] for p in PLATFORMS])
    train_platform = np.random.default_rng(TRAIN_PLATFORM_SEED).choice(
        len(PLATFORMS), size=train.size, p=mix
    )
    x_train = np.empty((train.size, N_FEATURES), dtype=np.float64)
    for k, platform in enumerate(PLATFORMS):
        sel = train_platform == k
        x_train[sel] = render_many(x[train[sel]], platform, train[sel])
    y_train = y[train]

    # Held-out pool: every held-out image on every platform.
    pixels = np.concatenate([render_many(x[held], p, held) for p in PLATFORMS])
    np.savez_compressed(
        out / assets.POOL_FILE,
        pixels=pixels,
        labels=np.tile(y[held], len(PLATFORMS)).astype(np.uint8),
        platform=np.repeat(np.arange(len(PLATFORMS)), held.size).astype(np.uint8),
        image=np.tile(held, len(PLATFORMS)).astype(np.int16),
        platforms=np.array(PLATFORMS),
    )

    no_mobile = train_platform != PLATFORMS.index("mobile")
    specs = {
        assets.CHAMPION: (
            f"softmax regression (L2 {CHAMPION_L2:g}) on the production mix",
            lambda: fit_softmax_regression(x_train, y_train, CHAMPION_L2),
            int(train.size),
        ),
        assets.CANDIDATE_REGRESSED: (
            f"MLP {N_FEATURES}-{MLP_HIDDEN}-10 (ReLU, L2 {MLP_L2:g}) on an export "
            "missing the mobile captures",
            lambda: fit_mlp(x_train[no_mobile], y_train[no_mobile], MLP_HIDDEN, MLP_L2, INIT_SEED),
            int(no_mobile.sum()),
        ),
        assets.CANDIDATE_GOOD: (
            f"MLP {N_FEATURES}-{MLP_HIDDEN}-10 (ReLU, L2 {MLP_L2:g}) on the production mix",
            lambda: fit_mlp(x_train, y_train, MLP_HIDDEN, MLP_L2, INIT_SEED),
            int(train.size),
        ),
    }
    pool = assets.load_pool(out)
    models: dict[str, Any] = {}
    for name, (description, fit, n_rows) in specs.items():
        path = assets.model_path(name, out)
        export_onnx(fit(), path, f"mirrorgate demo {name}: {description}")
        models[name] = {
            "file": path.name,
            "sha256": file_sha256(path),
            "model": description,
            "training_rows": n_rows,
            **evaluate(OfflineModel(path), pool),
        }
    train_counts = {p: int((train_platform == k).sum()) for k, p in enumerate(PLATFORMS)}
    manifest: dict[str, Any] = {
        "dataset": {
            "name": "UCI Optical Recognition of Handwritten Digits (scikit-learn load_digits)",
            "licence": "CC BY 4.0",
            "doi": "10.24432/C50P49",
            "images": int(n),
        },
        "split": {
            "seed": SPLIT_SEED,
            "train_images": int(train.size),
            "held_out_images": int(held.size),
            "train_captures_per_platform": train_counts,
        },
        "production_mix": PRODUCTION_MIX,
        "pool": {
            "file": assets.POOL_FILE,
            "sha256": file_sha256(out / assets.POOL_FILE),
            "rows": len(pool),
            "rows_per_platform": {p: int(pool.rows_of(p).size) for p in PLATFORMS},
        },
        "models": models,
    }
    (out / assets.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def report(manifest: dict[str, Any]) -> str:
    """The accuracy table of docs/demo.md (markdown)."""
    head = "| model | " + " | ".join(PLATFORMS) + " | production mix | pool (unweighted) |"
    lines = [head, "|" + "---|" * (len(PLATFORMS) + 3)]
    for name, m in manifest["models"].items():
        cells = [
            f"{m['per_platform'][p]['accuracy']:.4f} "
            f"({m['per_platform'][p]['correct']}/{m['per_platform'][p]['n']})"
            for p in PLATFORMS
        ]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {m['mix_accuracy']:.4f} | {m['pool_accuracy']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=assets.ASSETS_DIR, help="output folder")
    parser.add_argument(
        "--examples",
        type=Path,
        default=None,
        help="also copy champion + candidate_regressed here as champion.onnx/candidate.onnx "
        "(default: examples/models when --out is the package's assets folder)",
    )
    args = parser.parse_args(argv)
    manifest = build(args.out)
    examples = args.examples
    if examples is None and args.out.resolve() == assets.ASSETS_DIR:
        examples = ROOT / "examples" / "models"
    if examples is not None:
        examples.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(assets.model_path(assets.CHAMPION, args.out), examples / "champion.onnx")
        shutil.copyfile(
            assets.model_path(assets.CANDIDATE_REGRESSED, args.out), examples / "candidate.onnx"
        )
    print(f"wrote {args.out}")
    print(report(manifest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
