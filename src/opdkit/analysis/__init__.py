"""Analyses: the bias–variance experiment (``variance``) and the training-run report (``run_report``).

``variance`` is the experiment's public import path; it re-exports ``toy`` (the toy problem),
``estimators`` (the gradient estimators and their moments), ``variance_experiment`` (the runner),
``variance_report`` (CSV and Markdown) and ``variance_cli`` (the command line).

Importing this package imports nothing heavy; import the submodule you need
(``opdkit.analysis.variance`` needs torch, the plots need matplotlib).
"""
