"""Gradient-flow diagnostics: what GC-ODE and GC-W claim to change, measured on a model (`docs/diagnostics.md`)."""

from .measure import diagnose
from .recorder import GradientRecorder
from .report import BranchShare, DiagnosticReport, GroupGradient, StateGradient
from .stats import coherence, cosine, gsnr, per_sample_gradients

__all__ = [
    "BranchShare",
    "DiagnosticReport",
    "GradientRecorder",
    "GroupGradient",
    "StateGradient",
    "coherence",
    "cosine",
    "diagnose",
    "gsnr",
    "per_sample_gradients",
]
