"""The heads: registry and grids, the hand-written estimators, and where each is fit."""
