"""Exact evaluation views and ``--eval-only --weights`` re-scoring of classifier files.

The views are compared with the libraries the official pipelines call (OpenCV for mmcv's
``imresize``, torchvision's PIL transforms for ``build_transform(is_train=False)``); a file in the
official fine-tuned layout is scored through the launchers and compared with a re-statement of the
official forward written here from ``models/modeling_finetune_bootmae.py``'s equations."""

from __future__ import annotations

import fractions
import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from bootmae_ds.data.labelled import eval_transform, load_images
from bootmae_ds.interop.classifiers import ClassifierFileError, read_classifier
from bootmae_ds.interop.safe_load import UnsafeFileError, safe_torch_load

D, DEPTH, P, IMG, HEADS = 96, 2, 4, 32, 4  # the demo encoder's width, patch, size and heads (init.config demo)


def test_segmentation_view_is_opencv_inter_linear_bit_for_bit() -> None:
    from bootmae_ds.config.segment import load_segment_config
    from bootmae_ds.segment.data import eval_views, rescale_size, resize_label

    g = np.random.default_rng(0)
    for cfg in (load_segment_config("ade20k_base"), load_segment_config("ade20k_base_ms"),
                load_segment_config("demo")):
        for h, w in ((48, 64), (97, 113), (375, 500), (512, 683), (683, 512)):
            image = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for view in eval_views(torch.from_numpy(image).permute(2, 0, 1), cfg):
                H, W = view.shape[-2:]
                expected = cv2.resize(image, (W, H), interpolation=cv2.INTER_LINEAR)
                assert np.array_equal(view.permute(1, 2, 0).numpy(), expected), (h, w, H, W)
    label = g.integers(0, 151, (97, 113), dtype=np.uint8)
    size = rescale_size(97, 113, (2048, 512))
    expected = cv2.resize(label, size[::-1], interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(resize_label(torch.from_numpy(label), size).numpy(), expected)


def test_classification_view_is_the_official_build_transform_bit_for_bit() -> None:
    official = T.Compose([T.Resize(int(224 / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    g = np.random.default_rng(0)
    for h, w in ((224, 300), (500, 375), (256, 256), (300, 224)):
        image = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = np.asarray(official(Image.fromarray(image)))
        ours = eval_transform(torch.from_numpy(image).permute(2, 0, 1), 224, 0.875)
        assert np.array_equal(ours.permute(1, 2, 0).numpy(), expected), (h, w)


# -- files in the official fine-tuned layout ---------------------------------------------------
def official_state(classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the keys of the official fine-tuned model (abs pos emb, no rel pos bias)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.05, base: float = 0.0) -> torch.Tensor:
        return base + scale * torch.randn(*shape, generator=g)

    n = (IMG // P) ** 2
    sd = {"cls_token": r(1, 1, D, scale=0.5), "pos_embed": r(1, n + 1, D, scale=0.5),
          "patch_embed.proj.weight": r(D, 3, P, P), "patch_embed.proj.bias": r(D)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd |= {b + "norm1.weight": r(D, scale=0.2, base=1), b + "norm1.bias": r(D, scale=0.2),
               b + "attn.q_bias": r(D, scale=0.2), b + "attn.v_bias": r(D, scale=0.2),
               b + "attn.qkv.weight": r(3 * D, D, scale=0.1), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
               b + "norm2.weight": r(D, scale=0.2, base=1), b + "norm2.bias": r(D, scale=0.2),
               b + "mlp.fc1.weight": r(4 * D, D, scale=0.1), b + "mlp.fc1.bias": r(4 * D),
               b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)}
    return sd | {"fc_norm.weight": r(D, scale=0.2, base=1), "fc_norm.bias": r(D, scale=0.2),
                 "head.weight": r(classes, D, scale=0.5), "head.bias": r(classes, scale=0.5)}


def official_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``VisionTransformer.forward`` of modeling_finetune_bootmae.py, restated (fp32, eval)."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], dim=1) + sd["pos_embed"]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros(D), sd[b + "attn.v_bias"]])
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"], bias).reshape(len(x), -1, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        attn = ((q * (D // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(len(x), -1, D), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])), sd[b + "mlp.fc2.weight"],
                     sd[b + "mlp.fc2.bias"])
        x = x + h
    pooled = F.layer_norm(x[:, 1:].mean(1), (D,), sd["fc_norm.weight"], sd["fc_norm.bias"], eps=1e-6)
    return F.linear(pooled, sd["head.weight"], sd["head.bias"])


def test_official_layout_reads_exactly_and_damage_is_named(tmp_path) -> None:
    sd = official_state(10)
    ema = {k: v + 0.01 for k, v in sd.items()}
    path = tmp_path / "BootMAE_demo_FT.pth"
    meta = {"epoch": np.int64(99), "acc": np.float64(84.2), "hist": np.arange(3.0), "dtype": np.dtype("float32")}
    torch.save({"model": sd, "model_ema": ema, "meta": meta}, path)  # NumPy values in meta load safely
    x = torch.randn(5, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    for which, state in ((False, sd), (True, ema)):
        file = read_classifier(path, ema=which, heads={D: HEADS})
        assert (file.layout, file.img_size, file.num_classes, file.mean) == ("official", IMG, 10, (0.5,) * 3)
        with torch.no_grad():
            ours, ref = file.model(x), official_forward(state, x)
        rel = ((ours - ref).norm() / ref.norm()).item()
        print(f"official layout ({'model_ema' if which else 'model'}): logits relative error {rel:.2e}")
        assert rel < 1e-5
    for damage, key in ((lambda s: s.pop("blocks.1.mlp.fc2.bias"), "blocks.1.mlp.fc2.bias"),
                        (lambda s: s.__setitem__("fc_norm.weight", torch.ones(D - 1)), "fc_norm.weight"),
                        (lambda s: s.__setitem__("blocks.0.attn.relative_position_bias_table", torch.zeros(3, 4)),
                         "relative_position_bias_table")):
        bad = dict(sd)
        damage(bad)
        torch.save({"model": bad}, tmp_path / "bad.pth")
        with pytest.raises(ClassifierFileError, match=key) as err:
            read_classifier(tmp_path / "bad.pth", heads={D: HEADS})
        assert "\n" not in str(err.value)
    torch.save({"model": sd, "meta": {"x": fractions.Fraction(1, 3)}}, tmp_path / "unsafe.pth")
    with pytest.raises(UnsafeFileError, match="fractions.Fraction"):
        safe_torch_load(tmp_path / "unsafe.pth")


def _launcher(name: str):
    import importlib.util

    from distributed import ROOT

    spec = importlib.util.spec_from_file_location(f"launcher_{name}", ROOT / "launchers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder(root, sizes: list[tuple[int, int]], classes: int):
    g = np.random.default_rng(3)
    for i, (h, w) in enumerate(sizes):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_eval_only_scores_a_released_layout_on_any_number_of_ranks(tmp_path, capsys) -> None:
    from distributed import deepspeed_cmd, run

    from bootmae_ds.data.sources import FolderSource

    launcher = _launcher("finetune")

    classes = 3
    _folder(tmp_path / "val", [(32, 32), (40, 36), (48, 64), (33, 45), (64, 40), (32, 50), (70, 70)], classes)
    sd = official_state(classes)
    torch.save({"model": sd}, tmp_path / "ft.pth")
    common = ["--config", "demo", "--eval-only", "--weights", str(tmp_path / "ft.pth"),
              "--set", f"data.val={tmp_path / 'val'}", "data.eval_batch_size=2", "data.num_workers=0",
              f"model.num_classes={classes}"]
    # bad input: a one-line error and status 2 before any work
    assert launcher.main(["--config", "demo", "--output-dir", str(tmp_path / "x"), "--weights", "f.pth"]) == 2
    torch.save({"model": official_state(10)}, tmp_path / "ten.pth")
    assert launcher.main([*common[:4], str(tmp_path / "ten.pth"), *common[5:], "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "go together" in err and "10 classes and data.val has 3" in err and not (tmp_path / "x").exists()

    one = run(["python", "launchers/finetune.py", *common, "--output-dir", str(tmp_path / "one")])
    two = run(deepspeed_cmd("launchers/finetune.py", *common, "--output-dir", str(tmp_path / "two")))
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stdout[-3000:]
    r1, r2 = (json.loads((tmp_path / d / "eval_only.json").read_text()) for d in ("one", "two"))
    assert (r1["world_size"], r2["world_size"], r1["images"], r2["images"]) == (1, 2, 7, 7)
    assert (r1["top1"], r1["top5"], r1["per_class"]) == (r2["top1"], r2["top5"], r2["per_class"])
    assert math.isclose(r1["loss"], r2["loss"], rel_tol=1e-6)
    # and what the launch scored is the official forward's prediction on the official view
    val = load_images(FolderSource(tmp_path / "val"), IMG, crop_pct=1.0)
    with torch.no_grad():
        logits = official_forward(sd, val.images.float() / 127.5 - 1)
    hits = (logits.argmax(1) == val.labels).tolist()
    assert r1["top1"] == pytest.approx(100 * sum(hits) / 7)
    assert [c["top1"] for c in r1["per_class"]] == pytest.approx(
        [100 * sum(h for h, y in zip(hits, val.labels.tolist()) if y == k) / max(val.labels.tolist().count(k), 1)
         for k in range(classes)])
    assert [c["name"] for c in r2["per_class"]] == ["c0", "c1", "c2"]
    assert "| class | name | images | top-1 % | top-5 % |" in (tmp_path / "two" / "eval_only.md").read_text()


def test_run_best_and_mae_layouts_read_back_the_classifier(tmp_path) -> None:
    """A RUN/best export (timm layout + config.json) and the same weights in MAE's fine-tuned file
    layout (timm keys under ``model``) give back the classifier's logits."""
    from bootmae_ds.config import load_config
    from bootmae_ds.interop.encoders import EncoderExport
    from bootmae_ds.interop.export import to_timm_state_dict, write_export
    from bootmae_ds.models import build_model
    from bootmae_ds.models.classifier import ViTClassifier

    cfg = load_config("demo")
    torch.manual_seed(0)
    model = ViTClassifier(build_model(cfg).encoder, 7, head_init_scale=1.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    write_export(EncoderExport(model.encoder, cfg, {"source": "run", "run_dir": "r", "tag": "t", "step": 1,
                                                    "world_size": 1, "which": "online", "fingerprint": "f"},
                               head=model.head, fc_norm=model.fc_norm), tmp_path / "best")
    torch.save({"model": to_timm_state_dict(model.encoder, model.head, model.fc_norm)}, tmp_path / "mae_like.pth")
    x = torch.randn(3, 3, 32, 32)
    for path, layout, mean in ((tmp_path / "best", "timm", (0.5,) * 3), (tmp_path / "mae_like.pth", "mae", (0.485, 0.456, 0.406))):
        file = read_classifier(path, heads={cfg.model.embed_dim: cfg.model.num_heads})
        assert (file.layout, file.num_classes, file.mean) == (layout, 7, mean)
        with torch.no_grad():
            torch.testing.assert_close(file.model(x), model(x), rtol=1e-5, atol=1e-5)
