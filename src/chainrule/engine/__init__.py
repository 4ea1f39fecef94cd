"""The engine: tracer core, primitive table, front ends and transforms.

Imports flow one way: core <- rules <- replay <- dynamic <- transforms.
Nothing in the engine imports from the rest of chainrule except `errors`.
"""
