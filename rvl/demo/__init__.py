"""``rvl demo``: the whole pipeline on built-in phantoms (:mod:`rvl.demo.cli` runs the stages of
:mod:`rvl.demo.stages`, then :mod:`rvl.demo.evaluation` scores both models and :mod:`rvl.demo.report` writes the
report)."""
