"""Alignment methods: how the cost of one link (base group <- target group) is built.

Each method is a module of its own: ``weight`` (weight matching) and ``activation`` (activation
matching). The coordinate descent that solves the links (``descent``) only asks a method for a
link's cost matrix and the objective.
"""
from .activation import activation_costs
from .descent import descent, solve_link
from .weight import WeightMatching

__all__ = ["WeightMatching", "activation_costs", "descent", "solve_link"]
