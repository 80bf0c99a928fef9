"""The retain projection as an option of the method (``model.protect_retained: {tolerance, limit}``,
:mod:`slug_pl.retain_projection`), on a plain CLIP run without a downstream target: the retain
set's pairs are protected (their images for vision tensors, their captions for text tensors).
SLUG's edit and GA's change stay orthogonal to what those inputs feed each changed tensor, and the
record names the departure; a method that cannot apply it, and an old config that sets it on the
target, are refused with one line saying why and where it went."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_pairs, write_config
from test_baselines import fit
from test_cli_ux import _last_error

from slug_pl.cli import main
from slug_pl.data.shards import expand_urls
from slug_pl.edit import apply_edit, load_edits
from slug_pl.families.open_clip import OpenClip
from slug_pl.retain_projection import RetainProjection

#: A projection as exact as float64 allows, of few pairs: 2 images × 17 tokens (16 patches and the
#: class token) and 2 captions span far fewer directions than the 64-wide tiny towers have.
PROTECT = {"tolerance": 1e-6, "limit": 2}


def protected_pairs(world: dict, family, limit: int):
    """The first ``limit`` retain pairs whose captions do not name the forgotten concept (read
    with tarfile and PIL, independent of slug_pl's readers): images ``(limit, 3, H, W)``, tokens."""
    concept = json.loads(Path(world["identities_json"]).read_text())[0]
    images, captions = read_pairs(expand_urls(world["corpus"]), family.image_transform())
    kept = [i for i, c in enumerate(captions) if concept.lower() not in c.lower()][:limit]
    return images[kept], family.tokenize([captions[i] for i in kept])


def inputs_of(model, family, module_name: str, images, tokens) -> torch.Tensor:
    """Every input ``(N, d)`` (float64) that encoding ``images`` and ``tokens`` feeds the module
    ``module_name`` of ``model`` (each token of each input a row)."""
    rows = []
    module = model.get_submodule(module_name)
    handle = module.register_forward_hook(lambda m, args, out: rows.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            family.encode_image(model, images)
            family.encode_text(model, tokens)
    finally:
        handle.remove()
    return torch.cat(rows).double()


def leak(delta: torch.Tensor, inputs: torch.Tensor) -> float:
    """‖ΔW X^T‖ / (‖ΔW‖ ‖X‖): how much of a change ``delta`` (out, in) reaches the inputs ``X``
    (N, in); 0 when every row of ΔW is orthogonal to every input."""
    delta = delta.double()
    return float((delta @ inputs.T).norm() / (delta.norm() * inputs.norm()))


def test_slug_on_a_plain_clip_keeps_its_edit_off_the_retain_pairs(tmp_path, monkeypatch, small_world,
                                                                   tiny_checkpoint, forget_shard):
    """Without a target, ``model.protect_retained`` protects the retain set's pairs: the chosen
    tensor's change is orthogonal to what their images (or captions) feed it, while the forget
    pairs' inputs still see it; summary.json and the departures name the retain projection."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, small_world, tiny_checkpoint, forget_shard, model={"protect_retained": PROTECT},
                          forget_target={"value": 1.0}, search={"top_k": 2, "max_evals": 3})
    torch.set_num_threads(1)
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)])
    run = tmp_path / "lightning_logs" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    record = summary["method"]["retain_projection"]
    assert record["option"] == "model.protect_retained" and record["departure"] == "a departure from SLUG's plain gradient"
    assert (record["tolerance"], record["limit"]) == (1e-6, 2)
    assert [(p["tower"], p["kind"], p["inputs"], p["tolerance"]) for p in record["protected"]] == [
        ("vision", "images", 2, 1e-6), ("text", "captions", 2, 1e-6)]
    departure = [d for d in summary["method"]["departures"] if d["name"] == "retain projection"]
    assert departure == [{"name": "retain projection", "option": "model.protect_retained",
                          "value": "the forget gradient projected off the retained inputs (tolerance 1e-06, limit 2)",
                          "authors": "none: SLUG's plain forget gradient (null)", "follows_authors": False}]
    assert not summary["method"]["reference_preset"]
    assert "## Retain projection: a departure from SLUG's plain gradient" in (run / "report.md").read_text()

    family = OpenClip("slug-tiny-vit", pretrained=tiny_checkpoint)
    model = family.load().eval()
    edits, _ = load_edits(run / "edit.safetensors")
    assert len(edits) == 1
    edit = edits[0]
    assert edit.name in record["rank"]  # only covered tensors are candidates
    delta = edit.edited - edit.original
    assert delta.norm() > 1e-3 * edit.original.norm()  # a real change
    images, tokens = protected_pairs(small_world, family, 2)
    protected = inputs_of(model, family, edit.name.removesuffix(".weight"), images, tokens)
    forget_images, forget_tokens = read_pairs([forget_shard], family.image_transform())
    forgotten = inputs_of(model, family, edit.name.removesuffix(".weight"), forget_images,
                          family.tokenize(forget_tokens))
    assert leak(delta, protected) < 1e-5
    assert leak(delta, forgotten) > 1e-2  # the forgotten person's inputs are moved


def test_ga_with_the_retain_projection_changes_only_off_the_retain_pairs(tmp_path, monkeypatch, small_world,
                                                                          tiny_checkpoint, forget_shard):
    """GA with ``model.protect_retained``: only covered tensors change, each change orthogonal to
    what the protected pairs feed it, so their embeddings stay as they were; the forget pairs'
    similarity still falls."""
    code, run, _ = fit(tmp_path, monkeypatch, small_world, tiny_checkpoint, forget_shard, "slug_pl.methods.GaModule",
                       max_epochs=2, lr=1e-3, target_value=-1.0, protect_retained=PROTECT)
    summary = json.loads((run / "summary.json").read_text())
    record = summary["method"]["retain_projection"]
    assert record["departure"] == "a departure from GA's plain gradient" and record["editable"] > 0
    family = OpenClip("slug-tiny-vit", pretrained=tiny_checkpoint)
    before, after = family.load().eval(), family.load().eval()
    edits, _ = load_edits(run / "edit.safetensors")
    for e in edits:
        apply_edit(after, e)
    changed = {e.name for e in edits if not torch.equal(e.edited, e.original)}
    assert changed and changed <= set(record["rank"])  # nothing the projection does not cover changes
    images, tokens = protected_pairs(small_world, family, 2)
    for e in edits:
        if e.name not in changed:
            continue
        module = before.get_submodule(e.name.removesuffix(".weight"))
        if isinstance(module, torch.nn.Embedding):  # the rows of the protected captions' tokens stay
            assert torch.equal(e.edited[tokens.unique()], e.original[tokens.unique()]), e.name
        else:
            inputs = inputs_of(before, family, e.name.removesuffix(".weight"), images, tokens)
            assert leak(e.edited - e.original, inputs) < 1e-5, e.name

    def embeddings(model, images, tokens):
        with torch.no_grad():
            return family.encode_image(model, images), family.encode_text(model, tokens)

    relative = [float((a - b).norm() / b.norm()) for a, b in zip(embeddings(after, images, tokens),
                                                                  embeddings(before, images, tokens))]
    assert max(relative) < 1e-4, relative  # the protected pairs' embeddings stay as they were
    forget_images, forget_captions = read_pairs([forget_shard], family.image_transform())

    def mean_cos(model):
        u, v = embeddings(model, forget_images, family.tokenize(forget_captions))
        return torch.nn.functional.cosine_similarity(u, v, dim=-1).mean().item()

    assert mean_cos(after) < mean_cos(before) - 0.1  # measured: 0.039 -> -0.203


@pytest.mark.parametrize("class_path, reason", [
    ("slug_pl.methods.SsdModule", "it scales single weights by their importance ratio"),
    ("slug_pl.methods.FtModule", "it learns from the retain pairs alone"),
    ("slug_pl.methods.SalunModule", "it confines every step to a saliency mask of single weights"),
])
def test_a_method_that_cannot_project_refuses_it_in_one_line(tmp_path, small_world, tiny_checkpoint, forget_shard,
                                                              capsys, class_path, reason):
    config = write_config(tmp_path, small_world, tiny_checkpoint, forget_shard,
                          trainer={"default_root_dir": str(tmp_path / "runs"), "max_epochs": 1})
    data = yaml.safe_load(config.read_text())
    data["model"] = {"class_path": class_path, "init_args": {"family": data["model"]["init_args"]["family"],
                                                             "protect_retained": {"tolerance": 0.1}}}
    config.write_text(yaml.safe_dump(data))
    assert main(["fit", "--config", str(config)]) == 2
    name = class_path.rsplit(".", 1)[-1].removesuffix("Module").lower()
    message = _last_error(capsys)
    assert message.startswith(f"model.protect_retained: {name} cannot keep its change off the retained inputs: "
                              f"{reason}"), message
    assert message.endswith("; set it null")
    assert not (tmp_path / "runs").exists()  # refused before any work


@pytest.mark.parametrize("key, value, new", [("protect_retained", True, "model.init_args.protect_retained"),
                                             ("protect_tolerance", 0.3, "model.init_args.protect_retained.tolerance"),
                                             ("protect_images", 2000, "model.init_args.protect_retained.limit")])
def test_an_old_config_s_target_protection_says_where_it_moved(tmp_path, small_world, tiny_checkpoint, forget_shard,
                                                               capsys, key, value, new):
    """The retain projection was the targets' ``protect_retained`` (``protect_tolerance``,
    ``protect_images``); an old config is told it is the method's ``model.protect_retained`` now."""
    config = write_config(tmp_path, small_world, tiny_checkpoint, forget_shard,
                          model={"target": {"class_path": "slug_pl.targets.Llava",
                                            "init_args": {"model": "unused", key: value}}},
                          trainer={"default_root_dir": str(tmp_path / "runs")})
    assert main(["fit", "--config", str(config)]) == 2
    message = _last_error(capsys)
    assert message.endswith(f"unknown key {key!r} of Llava: the retain projection moved to model.protect_retained, "
                            f"an option of the method (null: off; the target says what it protects) (write {new} "
                            f"there, or --{new})"), message


def test_the_option_checks_its_values():
    """``{tolerance, limit}``: a tolerance in [0, 1) or null (each source's recommended one), a
    positive limit; the default protects up to 2000 inputs at the recommended tolerance."""
    assert RetainProjection() == RetainProjection(None, 2000)
    with pytest.raises(ValueError, match="model.protect_retained.tolerance"):
        RetainProjection(1.5)
    for limit in (0, True):
        with pytest.raises(ValueError, match="model.protect_retained.limit"):
            RetainProjection(0.1, limit)


@pytest.mark.parametrize("value, shown", [(True, "True"), (0.05, "0.05")])
def test_a_value_of_another_shape_is_told_what_to_write(tmp_path, small_world, tiny_checkpoint, forget_shard, capsys,
                                                        value, shown):
    """An old habit (``protect_retained: true``) or a bare tolerance at the new place gets one line
    saying the shape, not jsonargparse's "import path" complaint."""
    config = write_config(tmp_path, small_world, tiny_checkpoint, forget_shard, model={"protect_retained": value},
                          trainer={"default_root_dir": str(tmp_path / "runs")})
    assert main(["fit", "--config", str(config)]) == 2
    assert _last_error(capsys) == (f"model.protect_retained: expected {{tolerance, limit}} (e.g. {{tolerance: 0.05}}; "
                                   f"each may be left out) or null (off), got {shown!r}")
