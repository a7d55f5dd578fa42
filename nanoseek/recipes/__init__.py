"""Recipes built from the stages: r1.py (the R1-Zero and R1 pipelines), demo.py (`nanoseek demo`, every
stage at micro scale) and report.py (the demo's report and its check).
"""
