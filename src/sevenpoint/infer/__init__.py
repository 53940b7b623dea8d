"""Inference: everything between a trained checkpoint (or its ONNX export) and what a user reads.

A case flows `Predictor.prepare` (decode, gate, crop and resize the images, encode the metadata, score the
out-of-distribution distance: `ood`) -> a backend's forward pass (torch eager, the frozen graph, or ONNX
Runtime on an `export`) -> `artifacts.postprocess` (temperatures, the clinician's corrections, the
criteria-aware diagnosis, prediction sets, doubt, the melanoma referral point) -> `Prediction`, which the
CLI prints, `serve` returns as JSON, `case_report` lays out as a printable page and `viz` draws as
attention overlays. Nothing here imports the training engine or Lightning (tests/test_layout.py keeps it so):
a clinic's prediction loads neither.
"""
