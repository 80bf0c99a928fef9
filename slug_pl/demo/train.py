"""Train the demo's tiny CLIP on the demo world, from random initialization, on a CPU in minutes.

A plain, deterministic torch loop (no Lightning): every corpus image is decoded and preprocessed
once into memory (they are 32x32), captions are tokenized once, then AdamW with linear warmup and
cosine decay minimizes open_clip's ``ClipLoss``. The weights are saved as a ``.safetensors``
state dict that ``open_clip.create_model(model_name, pretrained=path)`` loads, and the held-out
test sets are scored by zero-shot classification through the real loader
(:class:`slug_pl.families.open_clip.OpenClip`) and :mod:`slug_pl.evaluation.zeroshot`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slug_pl.atomic import atomic_output, write_text
from slug_pl.data.shards import decode_image, expand_urls, iter_raw_samples
from slug_pl.demo.training import clamp_logit_scale, one_thread, train_epochs, warmup_cosine
from slug_pl.demo.world import WorldSpec, build_world, spec_record
from slug_pl.evaluation.zeroshot import class_embeddings, image_embeddings, topk_hits

logger = logging.getLogger(__name__)


def _say(msg: str) -> None:
    logger.info(msg)
    print(msg, flush=True)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _no_random_init_warning():
    """Without open_clip's 'No pretrained weights loaded ... initialized randomly' (root logger)."""
    drop = _DropRandomInitWarning()
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


def _load_images(urls, transform) -> tuple[torch.Tensor, list[str], list[int | None]]:
    images, captions, labels = [], [], []
    for sample in iter_raw_samples(expand_urls(urls)):
        images.append(transform(decode_image(sample)))
        captions.append(sample.caption or "")
        labels.append(sample.label)
    return torch.stack(images), captions, labels


def _random_shift(images: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels (edge padding), drawn from ``gen``."""
    b, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (b, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's convention: no weight decay on gains, biases, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
                or "embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def evaluate_demo_clip(world_root: str | os.PathLike, checkpoint: str | os.PathLike,
                       model_name: str = "slug-demo-vit", split: str = "test") -> dict:
    """Zero-shot top-1 / top-5 on the world's held-out identities and objects of ``split``,
    loading ``checkpoint`` through :class:`~slug_pl.families.open_clip.OpenClip`."""
    from slug_pl.families.open_clip import OpenClip

    root = Path(world_root)
    family = OpenClip(model_name=model_name, pretrained=str(Path(checkpoint).resolve()))
    model = family.load()
    transform = family.image_transform()
    templates = json.loads((root / "templates.json").read_text())
    out = {}
    for what in ("identities", "objects"):
        classnames = json.loads((root / f"{what}.json").read_text())
        urls = sorted(str(p) for p in (root / split).glob(f"{what}-*.tar"))
        images, _, labels = _load_images(urls, transform)
        labels_t = torch.tensor(labels)
        classes = class_embeddings(family, model, classnames, templates[what])
        logits = image_embeddings(family, model, images) @ classes.T
        for k in (1, 5):
            out[f"{what}_top{k}"] = topk_hits(logits, labels_t, k).float().mean().item()
    return out


def _train_epochs(model, images, tokens, optimizer, schedule, loss_fn, gen, epochs: int, batch_size: int,
                  shift: int, t1: float) -> float:
    """The training loop of :func:`train_demo_clip` (AdamW steps on open_clip's ``ClipLoss``);
    returns the last epoch's mean loss."""

    def loss_of(idx, _):
        batch = images[idx] if not shift else _random_shift(images[idx], shift, gen)
        img_f = model.encode_image(batch, normalize=True)
        txt_f = model.encode_text(tokens[idx], normalize=True)
        return loss_fn(img_f, txt_f, model.logit_scale.exp())

    def report(epoch, loss):
        if (epoch + 1) % 4 == 0 or epoch + 1 in (1, epochs):  # a few lines, not one per epoch
            _say(f"demo CLIP: epoch {epoch + 1}/{epochs} loss {loss:.3f} ({time.perf_counter() - t1:.0f}s)")

    return train_epochs(loss_of, optimizer, schedule, n=images.shape[0], batch_size=batch_size, epochs=epochs,
                        gen=gen, after_step=lambda: clamp_logit_scale(model), report=report)


def train_demo_clip(
    world_root: str | os.PathLike,
    out_path: str | os.PathLike,
    model_name: str = "slug-demo-vit",
    epochs: int = 16,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    warmup_fraction: float = 0.05,
    shift: int = 0,
    seed: int = 0,
) -> dict:
    """Train ``model_name`` (an open_clip config, random init) on the world's corpus.

    Saves the state dict to ``out_path`` (``.safetensors``, written atomically) and the metrics
    (held-out zero-shot top-1 / top-5 on test identities and objects, training time, settings)
    to ``out_path`` with suffix ``.json``; returns the metrics.

    Args:
        world_root: a world built by :func:`~slug_pl.demo.world.build_world`.
        out_path: the checkpoint to write (``.safetensors``).
        model_name: an open_clip model config (slug_pl's shipped ones are registered).
        epochs / batch_size / lr / weight_decay: AdamW on open_clip's ``ClipLoss``, last partial
            batch dropped; no weight decay on gains, biases, embeddings and the logit scale.
        warmup_fraction: linear warmup over this fraction of the steps, then cosine decay to 0.
        shift: random translation of training images by up to this many pixels (0: none).
        seed: model initialization and batch order. Results are bit-identical for the same
            seed and ``torch.get_num_threads()``.
    """
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    from slug_pl.families.open_clip import register_model_configs

    world_root, out_path = Path(world_root), Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"out_path must end in .safetensors, got {out_path}")
    register_model_configs()
    torch.manual_seed(seed)
    with _no_random_init_warning():  # the demo CLIP is trained from random weights on purpose
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(model_name)

    t0 = time.perf_counter()
    corpus = sorted(str(p) for p in (world_root / "corpus").glob("corpus-*.tar"))
    images, captions, _ = _load_images(corpus, preprocess)
    tokens = tokenizer(captions)
    n = images.shape[0]
    load_seconds = time.perf_counter() - t0
    _say(f"demo CLIP: {n} training pairs loaded in {load_seconds:.1f}s; training {model_name} "
         f"for {epochs} epochs (batch {batch_size})")

    steps_per_epoch = n // batch_size  # drop the last partial batch: fixed batch size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the corpus ({n} pairs)")
    total = steps_per_epoch * epochs
    warmup = max(1, round(warmup_fraction * total))
    # fused AdamW is ~6x faster on CPU than the default per-tensor loop (the 49408-row token
    # embedding dominates the optimizer step)
    try:
        optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr,
                                      betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr,
                                      betas=(0.9, 0.98), eps=1e-6)
    schedule = warmup_cosine(optimizer, total, warmup)
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(seed)

    model.train()
    t1 = time.perf_counter()
    with one_thread():
        final_loss = _train_epochs(model, images, tokens, optimizer, schedule, loss_fn, gen, epochs, batch_size,
                                   shift, t1)
    train_seconds = time.perf_counter() - t1
    model.eval()

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_output(out_path, overwrite=True) as tmp:  # a cache: replaced when rebuilt
        # one metadata key: safetensors writes several keys in no fixed order (not byte-reproducible)
        save_file(state, str(tmp), metadata={
            "slug_pl_demo": json.dumps({"model_name": model_name, "seed": seed}, sort_keys=True)})

    metrics = evaluate_demo_clip(world_root, out_path, model_name=model_name, split="test")
    metrics.update({
        "train_seconds": round(train_seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup_fraction": warmup_fraction,
        "shift": shift,
        "seed": seed,
        "model_name": model_name,
        "n_pairs": n,
        "final_loss": final_loss,
        "checkpoint": str(out_path),
    })
    _say("demo CLIP: held-out zero-shot top-1 identities {identities_top1:.3f} objects "
         "{objects_top1:.3f} (top-5 {identities_top5:.3f} / {objects_top5:.3f})".format(**metrics))
    _write_json(out_path.with_suffix(".json"), metrics)
    return metrics


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n", overwrite=True)


def _model_config(model_name: str) -> dict | None:
    """The open_clip config of ``model_name`` (part of the training cache key: a changed config
    makes a cached checkpoint unloadable)."""
    import open_clip

    from slug_pl.families.open_clip import register_model_configs

    register_model_configs()
    return open_clip.get_model_config(model_name)


def _resolved_train_kwargs(train_kwargs: dict | None) -> dict:
    sig = inspect.signature(train_demo_clip)
    resolved = {k: p.default for k, p in sig.parameters.items()
                if p.default is not inspect.Parameter.empty}
    unknown = set(train_kwargs or {}) - set(resolved)
    if unknown:
        raise TypeError(f"unknown train_kwargs {sorted(unknown)}; allowed: {sorted(resolved)}")
    resolved.update(train_kwargs or {})
    return resolved


def ensure_demo(root: str | os.PathLike, spec: WorldSpec = WorldSpec(),  # noqa: B008 (frozen)
                train_kwargs: dict | None = None) -> dict:
    """Build the demo world under ``root/world`` and train the demo CLIP into
    ``root/model/<model_name>.safetensors``, both cached.

    Training is skipped when the checkpoint and its metrics JSON exist and were made from the
    same world (fingerprint) with the same training settings. Returns the world's paths (see
    :func:`~slug_pl.demo.world.build_world`) plus ``checkpoint``, ``metrics_json``, ``metrics``
    and ``model_name``.
    """
    root = Path(root).expanduser().resolve()
    kwargs = _resolved_train_kwargs(train_kwargs)
    t0 = time.perf_counter()
    world = build_world(root / "world", spec)
    if world.get("built"):
        _say(f"demo world: built {world['counts']['corpus']} corpus pairs at {world['root']} "
             f"in {time.perf_counter() - t0:.1f}s")
    else:
        _say(f"demo world: reusing {world['root']}")
    ckpt = root / "model" / f"{kwargs['model_name']}.safetensors"
    metrics_json = ckpt.with_suffix(".json")
    cache_key = {"world_fingerprint": world["fingerprint"],
                 "spec": spec_record(spec), "train_kwargs": kwargs,
                 "model_config": _model_config(kwargs["model_name"])}
    metrics = None
    if ckpt.is_file() and metrics_json.is_file():
        try:
            saved = json.loads(metrics_json.read_text())
        except ValueError:
            saved = {}
        if saved.get("cache_key") == cache_key:
            metrics = saved
            _say(f"demo CLIP: reusing {ckpt}")
    if metrics is None:
        metrics = train_demo_clip(world["root"], ckpt, **kwargs)
        metrics["cache_key"] = cache_key
        _write_json(metrics_json, metrics)
    return {**world, "checkpoint": str(ckpt), "metrics_json": str(metrics_json),
            "metrics": metrics, "model_name": kwargs["model_name"]}
