"""slug_pl: targeted unlearning for vision-language models with SLUG (Single Layer Unlearning
Gradient), as a PyTorch Lightning suite.

Where things live (docs/design.md §3): the gradient objectives and files in ``gradients.py``;
layer ranking in ``ranking.py``; the step search in ``step_search.py``; edits (patches) in
``edit.py``; the methods (SLUG's gradient pass and its search callback, the baselines) in
``methods/``; what the parts after the pass receive in ``context.py``; the run record in
``record.py``; evaluation in ``evaluation/``; data in ``data/``; model adapters in ``families/``;
downstream models in ``targets/``; the offline demo world in ``demo/``.
"""

__version__ = "0.1.0"
