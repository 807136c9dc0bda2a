"""Analyses: the bias–variance experiment (``variance``) and the training-run report (``run_report``).

Importing this package imports nothing heavy; import the submodule you need
(``opdkit.analysis.variance`` needs torch, the plots need matplotlib).
"""
