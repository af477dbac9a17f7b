"""Analysis: which layers matter (importance metrics over the residual stream) and CoLa chains of layers."""
