"""Algorithms behind one protocol; each registered explicitly here."""

from methods.base import Method, MethodContext, get_method, method_names, register
from methods.cd import CD
from methods.ct import CT, ICT
from methods.ddim import DDIM
from methods.edm import EDM
from methods.pd import PD

register(EDM)
register(DDIM)
register(PD)
register(CD)
register(CT)
register(ICT)

__all__ = ["Method", "MethodContext", "get_method", "method_names", "register"]
