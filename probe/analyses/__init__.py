"""Analyses built on the protocol: compare, few-shot, maps, samples, predict."""
