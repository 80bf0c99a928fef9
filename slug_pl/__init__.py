"""slug_pl: targeted unlearning for vision-language models with SLUG (Single Layer Unlearning
Gradient), as a PyTorch Lightning suite.

Where things live: the gradient objectives and files in ``gradients.py``; the Lightning module of
the pass and of evaluation in ``module.py``; layer ranking in ``ranking.py``; the step search and
its Callback in ``search.py``; edits (patches) in ``edit.py``; evaluation in ``evaluation/``; data
in ``data/``; model adapters in ``families/``; the offline demo world in ``demo/``.
"""

__version__ = "0.1.0"
