"""The engine: tracer core, primitive table, array semantics and transforms.

Imports flow one way: host <- core <- rules (registry <- shape <- elementwise <-
indexing, reductions, linalg, calls) <- arrays <- transforms. Nothing in the
engine imports from the rest of chainrule except `errors`.
"""
