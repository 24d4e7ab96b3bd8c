"""The stage contract: the values the operator and the trainer must agree on, written once.

The two sides never import each other (import-linter); they meet in this leaf, which imports
nothing but the standard library, so either image can carry it without the other's dependencies.
"""
