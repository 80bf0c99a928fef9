"""Keeping the edit off what must stay: the forget gradient projected off the inputs that the
retained prompts (or images) feed each tensor — the retain projection, ``model.protect_retained``.

An edit ``ΔW`` of a linear layer changes its output for an input ``x`` by ``ΔW x``. If every row of
``ΔW`` is orthogonal to the inputs ``x_1 … x_n`` that the retained prompts feed the layer, their
outputs at that layer do not change; for an embedding table, whose input is a row index, the rows
those prompts use stay as they are. So, with ``V`` an orthonormal basis of the span of those inputs
(the singular directions above ``tolerance`` × the largest singular value; the inputs are kept as
their Gram matrix ``XᵀX``, so every token of thousands of images fits), the projected forget
gradient

    g ← g − (g V) Vᵀ          (linear weights, g of shape (d_out, d_in), V of shape (d_in, r))
    g[rows used by them] ← 0  (embedding tables)

gives a single-layer edit that leaves every state of the retained inputs unchanged (up to the
dropped singular directions), while still moving the forgotten concept's, whose inputs lie partly
outside that span. When every covered tensor's change is so projected and no other tensor changes,
the retained inputs' states stay unchanged at every layer (each layer's inputs are unchanged, so
its outputs are): what a method that trains several layers (GA, GAFT) relies on.

**A departure from SLUG's plain gradient**, off by default. It is an option of the method
(:class:`RetainProjection`, ``model.protect_retained: {tolerance, limit}``; null: off), and the
run's record says so by name (``method.retain_projection`` in ``summary.json``, a report section,
a row of SLUG's departures). *What* is protected is the downstream target's to say
(:class:`ProtectedInputs`, from ``protected_inputs(context, limit)``):

- Stable Diffusion, SDXL: the retained concepts' prompts (the report's retain prompts), through the
  text tower at every position the UNet reads; recommended tolerance 0.05 (:data:`PROMPT_TOLERANCE`):
  names are discrete, repeated inputs, so their span is exact;
- UnlearnCanvas: the prompt grid's prompts of every other style (or object), the same way;
- LLaVA: the retain set's images whose captions name no forgotten concept, every patch, through the
  vision encoder; recommended tolerance 0.3 (:data:`NATURAL_TOLERANCE`): only the few directions
  most images share (colours, layout) are protected. With a small one nearly every direction of a
  128-wide tower is, the step that still forgets grows, and fresh images break (the LLaVA demo at
  0.05, protecting the validation images: other identities named 99 → 27 % of the time on held-out
  images);
- a plain CLIP run (no target): :func:`retain_pair_inputs`, the retain set's pairs whose captions
  name no forgotten concept — their images through the vision tower, their captions through the
  text tower (every token), each tower protected from its own inputs; tolerance 0.3 for both
  (natural data, like LLaVA's images).

:func:`build_projection` is the one place a method turns those inputs into the projection.
Biases and layer norms have no input to project off (their "input" is shared by every token): they
are not covered, and only covered tensors are edit candidates (SLUG) or may change (GA, GAFT) when
a projection is used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slug_pl.context import RunContext
from slug_pl.data.mining import concept_pattern
from slug_pl.data.shards import decode_image, iter_raw_samples
from slug_pl.markdown import table

#: The tolerance recommended for prompts: discrete, repeated inputs whose span is exact.
PROMPT_TOLERANCE = 0.05
#: The tolerance recommended for natural inputs (images, captions): the few directions most of
#: them share are protected, the specific ones left to the edit.
NATURAL_TOLERANCE = 0.3
#: The most protected inputs (prompts or images) by default.
DEFAULT_LIMIT = 2000


@dataclass(frozen=True)
class RetainProjection:
    """The retain projection, an option of the method: ``model.protect_retained: {tolerance, limit}``
    (``null``, the default: off, SLUG's plain gradient).

    Attributes:
        tolerance: input directions whose singular value is below this fraction of the largest are
            dropped from the protected span (in [0, 1); 0: the exact span). None: the tolerance the
            protected inputs recommend for their kind (:data:`PROMPT_TOLERANCE` for prompts,
            :data:`NATURAL_TOLERANCE` for images and captions).
        limit: the most protected inputs — prompts or images, the first ones in the order their
            source gives them (for a plain CLIP: pairs of the retain set).
    """

    tolerance: float | None = None
    limit: int = DEFAULT_LIMIT

    def __post_init__(self):
        if self.tolerance is not None:
            check_tolerance(self.tolerance, "model.protect_retained.tolerance")
        if isinstance(self.limit, bool) or self.limit < 1:
            raise ValueError(f"model.protect_retained.limit is the most protected inputs, a positive number, "
                             f"got {self.limit!r}")


@dataclass(frozen=True)
class ProtectedInputs:
    """What one tower must keep, as its source names it (a target, or the run's retain set).

    Attributes:
        tower: ``"text"`` or ``"vision"``: the CLIP tower the inputs go through.
        modules: the modules whose inputs are recorded: a module-name prefix (``"text_model."``)
            or a predicate on module names.
        encode: encodes the inputs through the CLIP (one or several forward calls; the outputs are
            not used).
        positions: bool ``(B, T)``: the token positions the downstream model reads, for an
            ``encode`` of one call; None: every token of every call.
        count: how many inputs are encoded (prompts or images).
        kind: ``"prompts"``, ``"images"`` or ``"captions"`` (for the record).
        description: what they are, in words (for the record).
        tolerance: the tolerance recommended for this kind of inputs (used when
            ``model.protect_retained.tolerance`` is not set).
        concepts: the concepts whose inputs these are, when they are named concepts (for the
            record; the concepts with at least one protected input).
    """

    tower: str
    modules: str | Callable[[str], bool]
    encode: Callable[[], object]
    positions: torch.Tensor | None
    count: int
    kind: str
    description: str
    tolerance: float
    concepts: tuple[str, ...] = ()


@dataclass
class InputProjection:
    """What the protected inputs feed each covered tensor.

    Attributes:
        bases: linear weight name -> orthonormal basis ``(d_in, r)`` of the protected inputs (float32).
        rows: embedding weight name -> the row indices the protected inputs use (long).
        prompts: how many protected inputs (prompts or images) were encoded.
        tolerance: singular values below this fraction of the largest were dropped (of a joined
            projection: the largest of its parts').
    """

    bases: dict[str, torch.Tensor]
    rows: dict[str, torch.Tensor]
    prompts: int
    tolerance: float

    def covers(self, name: str) -> bool:
        """Whether the gradient of parameter ``name`` is projected (only those may be edited)."""
        return name in self.bases or name in self.rows

    def apply(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``grads`` with every covered tensor projected (new tensors; the others as they are)."""
        out = dict(grads)
        for name, basis in self.bases.items():
            if name in out:
                g = out[name]
                v = basis.to(g.device, torch.float64)
                flat = g.to(torch.float64)
                out[name] = (flat - (flat @ v) @ v.T).to(g.dtype)
        for name, rows in self.rows.items():
            if name in out:
                g = out[name].clone()
                g[rows.to(g.device)] = 0
                out[name] = g
        return out

    def to(self, device: torch.device | str) -> InputProjection:
        """The same projection held on ``device``, its bases in float64 (as :meth:`apply` computes):
        for applying it at every optimizer step without copying the bases each time."""
        return InputProjection({n: b.to(device, torch.float64) for n, b in self.bases.items()},
                               {n: r.to(device) for n, r in self.rows.items()}, self.prompts, self.tolerance)

    def describe(self) -> dict:
        """For the run record: the prompts, the tolerance, and each covered tensor's protected rank."""
        return {"prompts": self.prompts, "tolerance": self.tolerance,
                "rank": {n: int(b.shape[1]) for n, b in self.bases.items()}
                | {n: int(r.numel()) for n, r in self.rows.items()}}

    @staticmethod
    def joined(parts: Sequence[InputProjection]) -> InputProjection:
        """One projection of parts that cover different tensors (each tower from its own inputs):
        their inputs counted together, the largest of their tolerances."""
        bases: dict[str, torch.Tensor] = {}
        rows: dict[str, torch.Tensor] = {}
        for part in parts:
            twice = [n for n in (*part.bases, *part.rows) if n in bases or n in rows]
            if twice:
                raise ValueError(f"two sets of protected inputs cover the same tensors (e.g. {twice[:3]}); each "
                                 f"must cover its own")
            bases |= part.bases
            rows |= part.rows
        return InputProjection(bases, rows, sum(p.prompts for p in parts), max((p.tolerance for p in parts), default=0.0))


#: Singular directions below this fraction of the largest are taken as zero (float64 leaves ~1e-16 ×
#: the largest in the directions an exactly rank-deficient span lacks; ~1e-8 through a Gram matrix).
GRAM_FLOOR = 1e-6


def check_tolerance(tolerance: float, what: str = "tolerance") -> None:
    """A projection's tolerance is a fraction of the largest singular value in [0, 1)."""
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"{what} is a fraction of the largest singular value in [0, 1), got {tolerance}")


def orthonormal_span(inputs: torch.Tensor, tolerance: float) -> torch.Tensor:
    """An orthonormal basis ``(d, r)`` of the span of the rows of ``inputs`` ``(n, d)``, keeping the
    singular directions whose singular value is above ``tolerance`` × the largest (and above
    :data:`GRAM_FLOOR` × it: what is left of an exactly rank-deficient span in float64 is zero)."""
    _, s, vh = torch.linalg.svd(inputs.to(torch.float64), full_matrices=False)
    keep = s > max(tolerance, GRAM_FLOOR) * s[0] if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    return vh[keep].T.to(torch.float32).contiguous()


def gram_span(gram: torch.Tensor, tolerance: float) -> torch.Tensor:
    """:func:`orthonormal_span` of inputs given by their Gram matrix ``XᵀX`` ``(d, d)`` (float64):
    the eigenvectors whose singular value ``sqrt(eigenvalue)`` is above ``tolerance`` × the
    largest (and above :data:`GRAM_FLOOR` × it). For inputs too many to keep (every patch of
    thousands of images), accumulated batch by batch."""
    eigenvalues, vectors = torch.linalg.eigh(gram.to(torch.float64))
    s = eigenvalues.clamp(min=0).sqrt()
    top = s.max() if s.numel() else torch.tensor(0.0, dtype=torch.float64)
    keep = s > max(tolerance, GRAM_FLOOR) * top if top > 0 else torch.zeros_like(s, dtype=torch.bool)
    return vectors[:, keep].flip(1).to(torch.float32).contiguous()  # largest first


@torch.no_grad()
def input_projection(model: nn.Module, modules: str | Callable[[str], bool], encode: Callable[[], object],
                     positions: torch.Tensor | None, prompts: int, tolerance: float = PROMPT_TOLERANCE) -> InputProjection:
    """Record what ``encode()`` (encoding the protected inputs, in one or several forward calls)
    feeds every ``nn.Linear`` and ``nn.Embedding`` of ``modules`` (a module-name prefix, or a
    predicate on module names), at the token positions ``positions`` (bool ``(B, T)``: the tokens
    the downstream model reads; None: every token of every call), and return the projection.
    ``prompts`` is how many inputs were encoded (for the record).

    Linear inputs must be ``(B, T, d)`` (or ``(B, d)`` with ``positions`` None); an embedding's
    index input ``(B, T)`` or ``(1, T)`` (position ids, shared by the batch). Linear inputs are
    kept as their Gram matrix (float64, ``d × d`` per layer), so any number of inputs fits in
    memory; the matrices are summed on the inputs' device and moved to the host once, at the end
    (ViT-L/14-336: 3.9 GB for all its layers, which used to cross per batch). Only modules that
    ``encode`` calls are covered.
    """
    check_tolerance(tolerance)
    wanted = (lambda name: name.startswith(modules)) if isinstance(modules, str) else modules
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, set[int]] = {}

    def linear_hook(name):
        def hook(module, args, output):
            x = args[0]
            x = (x[positions.to(x.device)] if positions is not None else x.reshape(-1, x.shape[-1]))
            x = x.detach().to(torch.float64)
            gram = x.T @ x  # summed where it is made: one transfer per tensor at the end, not per call
            if name in grams:
                grams[name] += gram
            else:
                grams[name] = gram
        return hook

    def embedding_hook(name):
        def hook(module, args, output):
            ids = args[0]
            if positions is not None:
                ids = ids.expand(positions.shape[0], -1) if ids.shape[0] == 1 else ids
                ids = ids[positions.to(ids.device)]
            rows.setdefault(name, set()).update(ids.unique().tolist())
        return hook

    handles = []
    for name, module in model.named_modules():
        if not name or not wanted(name):
            continue
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook(name + ".weight")))
        elif isinstance(module, nn.Embedding):
            handles.append(module.register_forward_hook(embedding_hook(name + ".weight")))
    try:
        encode()
    finally:
        for handle in handles:
            handle.remove()
    bases = {name: gram_span(gram.cpu(), tolerance) for name, gram in grams.items()}
    used = {name: torch.tensor(sorted(r), dtype=torch.long) for name, r in rows.items()}
    return InputProjection(bases, used, prompts, tolerance)


# -- what is protected: the sources ----------------------------------------------------------------

def prompt_inputs(context: RunContext, prompts: Sequence[str], modules: str | Callable[[str], bool],
                  description: str, concepts: Sequence[str] = ()) -> ProtectedInputs:
    """``prompts`` through the CLIP's text tower, every position (a text-to-image model reads the
    state of every position), in one call; recorded at ``modules``; tolerance
    :data:`PROMPT_TOLERANCE`."""
    family, clip = context.family, context.model
    tokens = family.tokenize(list(prompts)).to(next(clip.parameters()).device)
    return ProtectedInputs("text", modules, lambda: family.encode_text(clip, tokens),
                           torch.ones(tokens.shape, dtype=torch.bool), len(prompts), "prompts", description,
                           PROMPT_TOLERANCE, tuple(concepts))


def unnamed_retain_pairs(context: RunContext, limit: int,
                         transform: Callable | None = None) -> tuple[list[torch.Tensor], list[str | None]]:
    """The first ``limit`` pairs of the run's retain set (in shard order) whose caption names no
    forgotten concept (a pair without a caption counts too): their images through ``transform``
    (none decoded without one) and their captions (None where a pair has none)."""
    names, rules = concept_pattern(list(context.concepts)), context.input_rules
    images: list[torch.Tensor] = []
    captions: list[str | None] = []
    for sample in iter_raw_samples(list(context.retain_urls()), rules):
        if len(captions) >= limit:
            break
        if sample.caption is not None and names.search(sample.caption):
            continue
        if transform is not None:
            images.append(transform(decode_image(sample, rules)))
        captions.append(sample.caption)
    if not captions:
        raise ValueError("model.protect_retained is set but the retain set has no pair whose caption leaves the "
                         "forgotten concepts out: point data.retain at ordinary pairs")
    return images, captions


def retain_pair_inputs(context: RunContext, limit: int,
                       towers: Sequence[str] = ("vision", "text")) -> list[ProtectedInputs]:
    """What a plain CLIP run (no downstream target) protects: the first ``limit`` retain pairs
    whose captions name no forgotten concept (:func:`unnamed_retain_pairs`) — their images
    through the vision tower, their captions through the text tower, every token of both (the
    CLIP's embedding reads the last state of a token that attends to all the others), each tower
    of ``towers`` from its own inputs; tolerance :data:`NATURAL_TOLERANCE` (natural data)."""
    family, clip = context.family, context.model
    images, captions = unnamed_retain_pairs(context, limit, family.image_transform() if "vision" in towers else None)
    size = context.eval_batch_size
    sources = []
    if "vision" in towers:
        sources.append(ProtectedInputs(
            "vision", lambda name: family.tower_of(f"{name}.weight") == "vision",
            in_batches(family.encode_image, clip, torch.stack(images), size), None, len(images), "images",
            "the retain set's images whose captions name no forgotten concept, every patch", NATURAL_TOLERANCE))
    texts = [c for c in captions if c is not None]
    if "text" in towers and texts:
        sources.append(ProtectedInputs(
            "text", lambda name: family.tower_of(f"{name}.weight") == "text",
            in_batches(family.encode_text, clip, family.tokenize(texts), size), None, len(texts), "captions",
            "the captions of those retain pairs, every token", NATURAL_TOLERANCE))
    return sources


def in_batches(encode: Callable[[nn.Module, torch.Tensor], object], model: nn.Module, inputs: torch.Tensor,
               size: int) -> Callable[[], None]:
    """An ``encode`` for :class:`ProtectedInputs`: ``encode(model, batch)`` over ``inputs`` (first
    dimension: one input each; pixels or tokens) in batches of ``size``, each moved to the model's
    device."""
    device = next(model.parameters()).device

    def run() -> None:
        for start in range(0, len(inputs), size):
            encode(model, inputs[start:start + size].to(device))

    return run


# -- the method's side: the projection and its record ------------------------------------------------

def build_projection(model: nn.Module, option: RetainProjection, sources: Sequence[ProtectedInputs],
                     editable: Callable[[str], bool], method: str, how: str) -> tuple[InputProjection, dict]:
    """The retain projection of ``model`` off ``sources`` (each tower from its own inputs; the
    tolerance ``option.tolerance``, else each source's recommended one) and its record for
    ``summary.json`` (``method.retain_projection``).

    ``editable``: whether the method may change a parameter (e.g. read by the downstream model):
    the record counts and ranks the covered tensors among those. ``method``: the method's name in
    the record (``"SLUG"``, ``"GA"``); ``how``: what the method projects, in words.
    """
    if not sources:
        raise ValueError("model.protect_retained is set but nothing is protected: no tower the method edits has "
                         "protected inputs")
    parts, protected = [], []
    for source in sources:
        tolerance = source.tolerance if option.tolerance is None else option.tolerance
        part = input_projection(model, source.modules, source.encode, source.positions, source.count, tolerance)
        parts.append(part)
        protected.append({"tower": source.tower, "kind": source.kind, "inputs": source.count,
                          "description": source.description, "tolerance": tolerance,
                          "covered": len(part.bases) + len(part.rows)}
                         | ({"concepts": list(source.concepts)} if source.concepts else {}))
    projection = InputProjection.joined(parts)
    rank = {name: r for name, r in projection.describe()["rank"].items() if editable(name)}
    if not rank:
        raise ValueError("model.protect_retained covers no tensor the method may change (only linear weights and "
                         "embedding tables can be projected): set it null, or widen what may change")
    record = {"name": "retain projection", "option": "model.protect_retained",
              "departure": f"a departure from {method}'s plain gradient", "how": how,
              "tolerance": option.tolerance, "limit": option.limit, "protected": protected,
              "covered": len(projection.bases) + len(projection.rows), "editable": len(rank), "rank": rank}
    return projection, record


def report_lines(record: Mapping) -> list[str]:
    """The report's section on a run's retain projection (``record``: :func:`build_projection`'s)."""
    rows = [[p["tower"], f"{p['inputs']} {p['kind']}", p["description"], f"{p['tolerance']:g}", p["covered"]]
            for p in record["protected"]]
    lines = [f"## Retain projection: {record['departure']}", "",
             f"`{record['option']}` (limit {record['limit']}): {record['how']}, off the span of what the protected "
             f"inputs feed it (`slug_pl/retain_projection.py`); only the "
             f"{record['editable']} covered tensors the method may change could change (linear weights and "
             f"embedding tables; {record['covered']} covered in all).", ""]
    return lines + table(["tower", "protected inputs", "what", "tolerance", "covered tensors"], rows) + [""]
