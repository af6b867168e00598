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
from methods.edm import EDM
from methods.pd import PD

for _builtin in (EDM, DDIM, PD, CD, CT, ICT):
    register(_builtin)
load_plugins()

__all__ = ["ENTRY_POINT_GROUP", "Method", "MethodContext", "PaperResult", "PerfPasses",
           "all_methods", "get_method", "load_plugins", "method_names", "register",
           "teacher_method"]
