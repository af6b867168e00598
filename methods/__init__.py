"""Algorithms behind one protocol: the built-in ones registered here in report order, then the
plug-ins other packages declare in the `cmbench.methods` entry-point group."""

from methods.base import (
    ENTRY_POINT_GROUP,
    Method,
    MethodContext,
    PaperResult,
    PerfPasses,
    all_methods,
    get_method,
    load_plugins,
    method_names,
    register,
    teacher_method,
)
from methods.cd import CD
from methods.ct import CT, ICT
from methods.ddim import DDIM
from methods.ect import ECT
from methods.edm import EDM
from methods.meanflow import MeanFlow
from methods.pd import PD
from methods.scm import SCD, SCT

for _builtin in (EDM, DDIM, PD, CD, SCD, CT, ICT, ECT, SCT, MeanFlow):
    register(_builtin)
load_plugins()

__all__ = ["ENTRY_POINT_GROUP", "Method", "MethodContext", "PaperResult", "PerfPasses",
           "all_methods", "get_method", "load_plugins", "method_names", "register",
           "teacher_method"]
